"""`qdora plan`: how much GPU memory one rank needs for a QDoRA run, and what makes it fit.

The model is counted term by term (docs/design.md, "The 70B memory budget"), per GPU, for N ranks sharding with FSDP2:

- base: each decoder linear as NF4 — packed bytes (½ B/weight) + double-quantized absmax (1 B per 64
  weights), sharded over N — plus the replicated second-level statistics (fp32 per 256 blocks, 256-entry
  code, offset, NF4 code) and the fp32 row norms DoRA needs; layer norms sharded. The root group (lm_head,
  final norm, and the input embedding unless `embeddings="host"`) is gathered by FSDP2 from the forward
  through the backward, so it counts in full plus this rank's shard. The lm_head is dense (compute dtype)
  or NF4 (`lm_head="nf4"`). With `--offload params|all` the sharded part lives in host memory.
- host embedding (`embeddings="host"`, the default): the input embedding stays in host memory; only the
  looked-up rows travel to the GPU (qdora/core/host_embedding.py). Counted in host memory.
- adapters: r·(in+out) (+ out for the DoRA magnitude) per target; parameter + gradient in the adapter
  dtype (fp32 or bf16) plus the optimizer's two states (AdamW: adapter dtype; 8-bit AdamW: 1 B each),
  sharded over N; on the host with parameter offload (FSDP2's CPUOffloadPolicy steps the optimizer there).
- checkpoints: one hidden state per layer boundary, micro_batch·seq·hidden in bf16, for every layer; with
  `--offload activations|all` they go to pinned host memory on a side stream
  (qdora/train/offload.py) and `OFFLOADED_HIDDENS_IN_FLIGHT` remain on the GPU.
- recompute: one layer's saved tensors while its backward runs (see `layer_recompute_bytes`).
- logits: transformers' full loss peaks at ~10 B per token per vocab entry (bf16 logits, their fp32
  copy, the fp32 log-softmax); a chunked loss holds `LOSS_CHUNK_COPIES` fp32 copies of one chunk; the
  NF4-head loss walks the vocabulary in slices (see `nf4_head_loss_bytes`).
- transient: the largest dequantized matrix (bf16), alive with the recompute (the loss and a layer's
  backward never run at once, so the larger of loss and recompute+dequantized counts) plus, when the base
  is sharded or offloaded, two layers' NF4 bytes gathered (the current layer and FSDP2's prefetch).
- overhead: CUDA context and library workspaces (`CUDA_CONTEXT_GIB`, outside the caching allocator)
  and fragmentation (`FRAGMENTATION` of the allocated peak). Both are assumptions still to be measured,
  and the report says so.

When a run does not fit, the suggestion keeps the sequence length, then keeps the base on the GPUs
(hidden-state offload, NF4 lm_head, bf16 adapters, 8-bit AdamW, in that order) before streaming it from
host memory (`--offload params`).

`allocated_bytes` is comparable with `torch.cuda.max_memory_allocated`; `total_bytes` with the card.
Sizes are bytes; `--gpu-mem` is in GiB (a "24 GB" RTX 3090/4090 has 24 GiB).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qdora.core.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE
from qdora.errors import QdoraError
from qdora.options import (
    EMBEDDINGS,
    LM_HEAD,
    LOSS,
    METHOD,
    OFFLOAD,
    OPTIM,
    TRAIN_ADAPTER_DTYPE,
    offloads_activations,
    offloads_params,
    select_targets,
)
from qdora.tools.plan_experts import Experts, experts_from_config

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.75  # CUDA 12/13 context + cuBLAS workspace on Hopper/Ada: ~0.5-0.8 GiB (assumed)
FRAGMENTATION = 0.05  # caching-allocator slack over the allocated peak (assumed, to be measured)
LOSS_CHUNK_COPIES = 3  # fp32 logits chunk, its softmax/gradient, and a bf16 copy rounded up
FULL_LOSS_BYTES = 10  # per token per vocab entry with transformers' default loss (see module doc)
ADAPTER_DTYPE_BYTES = {"fp32": 4, "bf16": 2}
OFFLOADED_HIDDENS_IN_FLIGHT = 3  # with --offload activations: in use, being copied out, prefetched back
NF4_HEAD_VOCAB_SLICE = 8192  # vocab rows the NF4-head loss dequantizes at a time (qdora/train/nf4_head_loss.py)


@dataclass(frozen=True)
class Shape:
    """The few config fields memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: Experts | None = None  # MoE: the sparse MLP (Qwen3-MoE, Mixtral, Qwen2-MoE)
    fused: bool = False  # Phi-3: one qkv_proj and one gate_up_proj per layer instead of q/k/v and gate/up

    @property
    def active_intermediate(self) -> int:
        """The MLP width a token's activations go through (k routed experts + shared for MoE)."""
        return self.experts.active_ff() if self.experts else self.intermediate

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_paths(self) -> list[str]:
        """Module paths of every decoder-block linear, as a Llama checkpoint names them (for --target); for
        MoE also the fused expert parameters (`mlp.experts.gate_up_proj`, `--target experts`)."""
        mlp = "mlp.shared_expert" if self.experts else "mlp"
        attention = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
        paths = [f"model.layers.{n}.{'self_attn' if name in attention else mlp}"
                 f".{name}" for n in range(self.layers) for name in self.linears()]
        if self.experts:
            paths += [f"model.layers.{n}.mlp.experts.{p}" for n in range(self.layers) for p in ("gate_up_proj",
                                                                                                  "down_proj")]
        return paths

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear of one decoder layer (MoE: attention and the shared expert; the
        experts are `experts.weights`)."""
        h, i = self.hidden, self.intermediate
        if self.fused:
            return {"qkv_proj": (self.q_dim + 2 * self.kv_dim, h), "o_proj": (h, self.q_dim),
                    "gate_up_proj": (2 * i, h), "down_proj": (h, i)}
        attn = {"q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
                "o_proj": (h, self.q_dim)}
        if self.experts:
            s = self.experts.shared_ff
            return attn | ({"gate_proj": (s, h), "up_proj": (s, h), "down_proj": (h, s)} if s else {})
        return attn | {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def block_weights(self) -> list[tuple[int, int]]:
        """(out, in) of every NF4 weight of one layer: the linears, and for MoE every expert's."""
        return list(self.linears().values()) + (self.experts.weights(self.hidden) if self.experts else [])

    def dequantized_matrices(self) -> list[tuple[int, int]]:
        """(out, in) of what is ever dequantized at once: a linear, or one expert's fused gate_up / down."""
        extra = list(self.experts.fused(self.hidden).values()) if self.experts else []
        return list(self.linears().values()) + extra


@dataclass
class MemoryPlan:
    """Per-GPU bytes for each term, the settings they were computed for, and the verdict."""

    base: int
    adapters: int
    checkpoints: int
    recompute: int
    logits: int
    transient: int
    overhead: int
    allocated_bytes: int
    total_bytes: int
    gpu_mem_bytes: int
    fits: bool
    settings: dict
    details: dict = field(default_factory=dict)
    suggestion: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        s, d = self.settings, self.details
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        head = "NF4" if s["lm_head"] == "nf4" else "dense"
        embed = "on the host" if s["embeddings"] == "host" else "on the GPU"
        lines = [
            f"qdora plan: {s['gpus']} GPU(s) x {self.gpu_mem_bytes / GIB:g} GiB, seq {s['seq_len']}, "
            f"micro-batch {s['micro_batch']}, r={s['rank']} {s['method']}, target {s['target']}, "
            f"offload {s['offload']}, loss {s['loss']}, lm_head {s['lm_head']}, embeddings {s['embeddings']}, "
            f"adapters {s['adapter_dtype']}, optim {s['optim']}",
            f"  quantized base          {g(self.base)}   (NF4 decoder shard; root gathered all step: {head} "
            f"lm_head {d['root_frozen'] / GIB:.2f} GiB; input embedding {embed})",
            f"  adapters+grads+optim    {g(self.adapters)}   ({d['adapter_params']:,} params x "
            f"{d['adapter_bytes_per_param']} B)",
            *([f"  experts                 {e['count']} per layer, all resident in NF4 "
               f"({e['nf4_bytes_total'] / GIB:.2f} GiB before sharding, in the base above); {e['top_k']} routed "
               f"per token: activations of {e['active_ff']} FFN columns per token, not {e['count'] * e['ff']}"]
              if (e := d.get("experts")) else []),
            f"  checkpointed hiddens    {g(self.checkpoints)}"
            + ("   (offloaded to pinned host memory; 3 in flight)" if offloads_activations(s["offload"]) else ""),
            f"  layer recompute         {g(self.recompute)}",
            f"  logits / loss           {g(self.logits)}   (the larger of this and recompute+dequantized counts)",
            f"  transients              {g(self.transient)}",
            f"  = allocated peak        {g(self.allocated_bytes)}",
            f"  context+fragmentation   {g(self.overhead)}   (ASSUMED, not yet measured: CUDA context "
            f"{d['cuda_context_gib']:g} GiB + {100 * d['fragmentation']:g}% of the allocated peak)",
            f"  = total per GPU         {g(self.total_bytes)}",
            f"  host memory per rank    {g(d['host_bytes_per_rank'])}   (pinned hiddens, host embedding, "
            "offloaded shards + optimizer)",
        ]
        margin = (self.gpu_mem_bytes - self.total_bytes) / GIB
        where = "base on the GPUs" if not offloads_params(s["offload"]) else "base streamed from host memory"
        if self.fits:
            lines.append(f"fits ({where}): {self.total_bytes / GIB:.1f} GiB <= {self.gpu_mem_bytes / GIB:g} GiB, "
                         f"margin {margin:.1f} GiB")
        else:
            sug = self.suggestion
            if sug:
                where = "the base stays on the GPUs" if sug["base_resident"] else "the base streams from host memory"
                tail = (f"fits with {sug['flags']} ({sug['total_gib']:.1f} GiB, margin {sug['margin_gib']:.1f} "
                        f"GiB; {where})")
            else:
                tail = "no offload/precision/micro-batch/sequence setting makes it fit"
            lines.append(f"does not fit: {self.total_bytes / GIB:.1f} GiB > {self.gpu_mem_bytes / GIB:g} GiB; {tail}")
        return "\n".join(lines)


def shape_from_config(config) -> Shape:
    """Read a transformers config (object or dict); refuse configs without the fields memory needs."""
    d = config if isinstance(config, dict) else config.to_dict()
    d = d.get("text_config", d) if "hidden_size" not in d else d
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(d.get(k), int)]
    if missing:
        raise QdoraError(f"model config lacks integer field(s) {', '.join(missing)}: not a Llama-style causal LM")
    heads = d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    s = Shape(d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], heads, kv, head_dim,
              d["vocab_size"], bool(d.get("tie_word_embeddings", False)), experts_from_config(d),
              fused=d.get("model_type") == "phi3")
    if min(s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) < 1:
        raise QdoraError(f"model config has a non-positive size: {s}")
    return s


PLANNED_TRAIN_OPTIONS = ("model", "revision", "seq_len", "rank", "micro_batch", "method", "offload", "target")


def train_settings(config_file: str | Path) -> dict:
    """The options of a `qdora train` YAML that memory depends on (the file is checked as `qdora train` would)."""
    from qdora.train.config import read_yaml, resolve_config

    cfg = resolve_config(read_yaml(config_file), {}).to_dict()
    return {k: cfg[k] for k in PLANNED_TRAIN_OPTIONS if cfg.get(k) is not None}


def load_config(model: str, revision: str | None = None):
    """A model folder with config.json, a config.json file, a preset name (llama-3-70b, 8b, ...), or a Hub
    repository id `org/name` (only its config.json is fetched, at `revision`)."""
    from qdora.io.hub import names_org_repo, resolve_model
    from qdora.tools.presets import preset_config

    path = Path(model)
    if path.is_file():
        if revision:
            raise QdoraError(f"--revision {revision} applies to Hub models, but {model} is a local file")
    elif path.is_dir() or names_org_repo(model):
        path = resolve_model(model, revision, config_only=True).path / "config.json"
        if not path.is_file():
            raise QdoraError(f"{model} has no config.json")
    elif revision:
        raise QdoraError(f"--revision {revision} applies to Hub models, not to the preset {model}")
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise QdoraError(f"cannot read model config {path}: {e}") from e
    if "/" in model or model.endswith(".json"):
        raise QdoraError(f"no such model folder or config file: {model}")
    return preset_config(model)


def nf4_bytes(out_f: int, in_f: int, double_quant: bool = True) -> tuple[int, int]:
    """(shardable bytes, replicated bytes) of one NF4 weight as qdora stores it (qdora/core/nf4.py)."""
    blocks = out_f * in_f // BLOCKSIZE
    shardable = out_f * in_f // 2 + (blocks if double_quant else 4 * blocks)
    replicated = (4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * 256 + 4 if double_quant else 12) + 4 * 16 + 4 * out_f
    return shardable, replicated


def adapter_param_count(shape: Shape, rank: int, method: str, paths: list[str]) -> int:
    """Adapter parameters on the linears at `paths` (Shape.linear_paths); an expert parameter has one
    adapter per expert."""
    linears = shape.linears()
    fused = shape.experts.fused(shape.hidden) if shape.experts else {}
    total = 0
    for p in paths:
        leaf = p.rsplit(".", 1)[-1]
        is_expert = ".experts." in p and leaf in fused
        o, i = fused[leaf] if is_expert else linears[leaf]
        total += (shape.experts.count if is_expert else 1) * (rank * (i + o) + (o if method == "dora" else 0))
    return total


def layer_recompute_bytes(shape: Shape, tokens: int, method: str, act_bytes: int = 2) -> int:
    """Bytes alive for one recomputed decoder layer at its backward's peak (inside the MLP backward).

    Counted from what autograd saves in a Llama layer under bf16 autocast (T tokens, H hidden, Q = heads·
    head_dim, K = kv dim, I intermediate). Attention half, not yet back-propagated: the RMSNorm's fp32
    copy of its input (4 B·H) and bf16 output (the x shared by q/k/v), q and k after rope, v, the attention
    output and o_proj's contiguous input; for dora also the pre-scale outputs of q, k, v and o. MLP half,
    while the product's backward runs (down_proj's saved tensors already freed): the norm's fp32 copy and
    output, gate and up outputs and silu(gate), the three I-sized gradients d(product), d(silu), d(up)
    and two H-sized residual gradients; for dora also gate's and up's pre-scale outputs. x·Aᵀ (T·r) is
    ignored. Checked against live-tensor measurements on CPU (tests/test_plan.py).
    """
    t, h, q, k, i = tokens, shape.hidden, shape.q_dim, shape.kv_dim, shape.active_intermediate
    attn = h + (q + k) + k + 2 * q
    mlp = h + 3 * i + 3 * i + 2 * h
    if shape.experts:  # MoE: each token's input and output copied for each of its k experts
        mlp += 2 * shape.experts.top_k * h
    if method == "dora":
        attn += (q + 2 * k) + h
        mlp += 2 * i
    return t * (act_bytes * (attn + mlp) + 2 * 4 * h)


def root_bytes(shape: Shape, embeddings: str, lm_head: str, dtype_bytes: int = 2) -> tuple[int, int]:
    """(GPU bytes, host bytes) of the root parameters FSDP2 keeps gathered all step: the lm_head (dense in
    the compute dtype, or NF4), the final norm, and the input embedding unless it lives on the host."""
    h, v = shape.hidden, shape.vocab
    if lm_head == "nf4":
        sh, rep = nf4_bytes(v, h)
        head = sh + rep
    else:
        head = v * h * dtype_bytes
    embed = v * h * dtype_bytes
    gpu = head + h * dtype_bytes + (embed if embeddings == "device" else 0)
    if shape.tied and lm_head == "dense" and embeddings == "device":
        gpu -= embed  # one tensor serves both
    return gpu, (embed if embeddings == "host" else 0)


def adapter_bytes_per_param(adapter_dtype: str, optim: str) -> int:
    """Parameter + gradient in the adapter dtype, plus the optimizer's states: AdamW keeps two in the
    parameter's dtype, bitsandbytes' 8-bit AdamW two uint8 (its per-256 fp32 absmax is ignored)."""
    p = ADAPTER_DTYPE_BYTES[adapter_dtype]
    return 2 * p + (2 if optim in ("adamw8bit", "paged_adamw8bit") else 2 * p)


def nf4_head_loss_bytes(shape: Shape, tokens: int, vocab_slice: int = NF4_HEAD_VOCAB_SLICE,
                        dtype_bytes: int = 2) -> int:
    """Peak of the NF4-head loss (qdora/train/nf4_head_loss.py): `LOSS_CHUNK_COPIES` fp32 [tokens, slice]
    logits copies, one dequantized [slice, hidden] slice, and the fp32 [tokens, hidden] input-gradient
    accumulator plus its compute-dtype copy."""
    s = min(vocab_slice, shape.vocab)
    h = shape.hidden
    return LOSS_CHUNK_COPIES * 4 * tokens * s + s * h * dtype_bytes + tokens * h * (4 + dtype_bytes)


def plan_memory(
    config,
    gpus: int = 1,
    gpu_mem_gib: float = 24.0,
    seq_len: int = 2048,
    rank: int = 16,
    micro_batch: int = 1,
    method: str = "dora",
    offload: str = "none",
    target: str | list[str] = "all-linear",
    loss: str = "chunked",
    loss_chunk: int = 1024,
    embeddings: str = "host",
    lm_head: str = "dense",
    adapter_dtype: str = "fp32",
    optim: str = "adamw",
    dtype_bytes: int = 2,
    suggest: bool = True,
) -> MemoryPlan:
    """Per-GPU memory of a QDoRA run (see the module docstring for each term)."""
    shape = config if isinstance(config, Shape) else shape_from_config(config)
    _check(gpus, gpu_mem_gib, seq_len, rank, micro_batch, method, offload, loss, loss_chunk)
    for choice, value in ((EMBEDDINGS, embeddings), (LM_HEAD, lm_head), (TRAIN_ADAPTER_DTYPE, adapter_dtype),
                          (OPTIM, optim)):
        choice.check(value)
    targets = select_targets(target, shape.linear_paths(), "a Llama-shaped model")
    tokens = micro_batch * seq_len
    offload_params = offloads_params(offload)
    offload_acts = offloads_activations(offload)
    sharded = gpus > 1 or offload_params

    shardable = replicated = 0
    for o, i in shape.block_weights():
        sh, rep = nf4_bytes(o, i)
        shardable += sh
        replicated += rep
    layer_nf4 = shardable
    shardable *= shape.layers
    replicated *= shape.layers
    layer_norms = 2 * shape.layers * shape.hidden * dtype_bytes
    if shape.experts:  # the routers (and Qwen2-MoE's shared-expert gate) stay in the compute dtype
        layer_norms += shape.layers * (shape.experts.count + 1) * shape.hidden * dtype_bytes
    root, host_embed = root_bytes(shape, embeddings, lm_head, dtype_bytes)
    # FSDP2 keeps the root group gathered from forward through backward: the full root on every GPU,
    # plus this rank's shard of it (on the host with parameter offload).
    root_resident = root + (math.ceil(root / gpus) if sharded and not offload_params else 0)
    base = replicated + root_resident + (0 if offload_params else math.ceil((shardable + layer_norms) / gpus))

    n_adapter = adapter_param_count(shape, rank, method, targets)
    per_param = adapter_bytes_per_param(adapter_dtype, optim)
    adapter_total = n_adapter * per_param
    adapters = 0 if offload_params else math.ceil(adapter_total / gpus)

    boundary = tokens * shape.hidden * dtype_bytes
    checkpoints = (OFFLOADED_HIDDENS_IN_FLIGHT if offload_acts else shape.layers) * boundary
    recompute = layer_recompute_bytes(shape, tokens, method, dtype_bytes)
    if loss == "full":
        logits = FULL_LOSS_BYTES * tokens * shape.vocab
    elif lm_head == "nf4":
        logits = nf4_head_loss_bytes(shape, tokens, dtype_bytes=dtype_bytes)
    else:
        logits = LOSS_CHUNK_COPIES * 4 * min(loss_chunk, tokens) * shape.vocab
    largest = max(o * i for o, i in shape.dequantized_matrices())
    dequantized = largest * dtype_bytes
    transient = dequantized + (2 * layer_nf4 if sharded else 0)

    allocated = base + adapters + checkpoints + max(recompute + dequantized, logits) + transient - dequantized
    overhead = int(CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * allocated)
    total = allocated + overhead
    host = host_embed + (shape.layers * boundary if offload_acts else 0)
    if offload_params:
        host += math.ceil((shardable + layer_norms + root) / gpus) + math.ceil(adapter_total / gpus)
    settings = dict(gpus=gpus, gpu_mem_gib=gpu_mem_gib, seq_len=seq_len, rank=rank, micro_batch=micro_batch,
                    method=method, offload=offload, target=target, loss=loss, loss_chunk=loss_chunk,
                    embeddings=embeddings, lm_head=lm_head, adapter_dtype=adapter_dtype, optim=optim)
    details = dict(nf4_shardable_total=shardable, nf4_replicated=replicated, root_frozen=root,
                   root_resident=root_resident, host_embedding=host_embed, adapter_params=n_adapter,
                   adapter_bytes_per_param=per_param, checkpoint_per_layer=boundary,
                   largest_dequantized=largest * dtype_bytes, layer_nf4=layer_nf4, host_bytes_per_rank=host,
                   cuda_context_gib=CUDA_CONTEXT_GIB, fragmentation=FRAGMENTATION)
    if shape.experts:
        e = shape.experts
        expert_nf4 = sum(nf4_bytes(o, i)[0] for o, i in e.weights(shape.hidden)) * shape.layers
        details["experts"] = dict(count=e.count, top_k=e.top_k, ff=e.ff, shared_ff=e.shared_ff,
                                  nf4_bytes_total=expert_nf4, active_ff=e.active_ff())
    plan = MemoryPlan(base, adapters, checkpoints, recompute, logits, transient, overhead, allocated, total,
                      int(gpu_mem_gib * GIB), total <= gpu_mem_gib * GIB, settings, details)
    if not plan.fits and suggest:
        plan.suggestion = _cheapest_fit(shape, settings, dtype_bytes)
    return plan


# What may change to make a run fit, cheapest first: exact memory modes (hidden states to pinned host
# memory), then approximations that keep the base on the GPUs (NF4 lm_head, bf16 adapters, 8-bit AdamW),
# then streaming the base from host memory every step.
_LADDER = (
    {},
    {"offload": "activations"},
    {"offload": "activations", "lm_head": "nf4"},
    {"offload": "activations", "lm_head": "nf4", "adapter_dtype": "bf16"},
    {"offload": "activations", "lm_head": "nf4", "adapter_dtype": "bf16", "optim": "adamw8bit"},
    {"offload": "params"},
    {"offload": "all"},
    {"offload": "all", "lm_head": "nf4", "adapter_dtype": "bf16", "optim": "adamw8bit"},
)
_ORDER = {"offload": OFFLOAD.values, "lm_head": LM_HEAD.values, "adapter_dtype": TRAIN_ADAPTER_DTYPE.values,
          "optim": OPTIM.values, "embeddings": ("device", "host")}


def _apply(settings: dict, change: dict) -> dict:
    """`settings` with `change` applied where it saves memory; never undoes a saving the user chose."""
    out = dict(settings)
    for k, v in change.items():
        if _ORDER[k].index(v) > _ORDER[k].index(out[k]):
            out[k] = v
    return out


def _flags(old: dict, new: dict) -> str:
    keys = ("offload", "lm_head", "adapter_dtype", "optim", "embeddings", "micro_batch", "seq_len")
    return " ".join(f"--{k.replace('_', '-')} {new[k]}" for k in keys if new[k] != old[k])


def _cheapest_fit(shape: Shape, settings: dict, dtype_bytes: int) -> dict | None:
    """The least costly change that fits: keep the sequence length if at all possible, then keep the base on
    the GPUs if possible (`_LADDER`), then keep the micro batch as large as possible (gradient
    accumulation makes up the rest)."""
    s = settings
    seqs, L = [], s["seq_len"]
    while L >= 256 or not seqs:
        seqs.append(L)
        L //= 2
    mbs, b = [], s["micro_batch"]
    while b >= 1:
        mbs.append(b)
        b //= 2
    seen = []
    for seq in seqs:
        for change in _LADDER:
            for mb in mbs:
                kw = _apply(dict(s, seq_len=seq, micro_batch=mb), change)
                if kw == s or kw in seen:
                    continue
                seen.append(kw)
                p = plan_memory(shape, **kw, dtype_bytes=dtype_bytes, suggest=False)
                if p.fits:
                    return dict(flags=_flags(s, kw), total_gib=p.total_bytes / GIB,
                                margin_gib=(p.gpu_mem_bytes - p.total_bytes) / GIB,
                                base_resident=not offloads_params(kw["offload"]),
                                **{k: kw[k] for k in ("offload", "micro_batch", "seq_len", "lm_head",
                                                      "adapter_dtype", "optim", "embeddings")})
    return None


def _check(gpus, gpu_mem_gib, seq_len, rank, micro_batch, method, offload, loss, loss_chunk) -> None:
    for name, v in (("gpus", gpus), ("seq_len", seq_len), ("rank", rank), ("micro_batch", micro_batch),
                    ("loss_chunk", loss_chunk)):
        if not isinstance(v, int) or v < 1:
            raise QdoraError(f"{name} must be a positive integer, not {v!r}")
    if not gpu_mem_gib > 0 or not math.isfinite(gpu_mem_gib):
        raise QdoraError(f"gpu memory must be a positive number of GiB, not {gpu_mem_gib!r}")
    METHOD.check(method)
    OFFLOAD.check(offload)
    LOSS.check(loss)



