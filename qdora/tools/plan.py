"""`qdora plan`: how much GPU memory one rank needs for a QDoRA run, and what makes it fit.

The model is counted term by term (docs/design.md, "The 70B memory budget"), per GPU, for N ranks sharding with FSDP2:

- base: each decoder linear as NF4 — packed bytes (½ B/weight) + double-quantized absmax (1 B per 64
  weights), sharded over N — plus the replicated second-level statistics (fp32 per 256 blocks, 256-entry
  code, offset, NF4 code) and the fp32 row norms DoRA needs; embeddings, lm_head and norms stay in the
  model dtype (bf16) and are sharded. With `--offload params|all` the sharded part lives in host memory.
- adapters: r·(in+out) (+ out for the DoRA magnitude) per target; parameter + gradient + AdamW's two
  states, all in the adapter dtype (fp32 by default: 16 B/parameter), sharded over N; on the host with
  parameter offload (FSDP2's CPUOffloadPolicy steps the optimizer on the CPU).
- checkpoints: one hidden state per layer boundary, micro_batch·seq·hidden in bf16, for every layer
  (2 in flight with `--offload activations|all`).
- recompute: one layer's saved tensors while its backward runs (see `layer_recompute_bytes`).
- logits: transformers' full loss peaks at ~10 B per token per vocab entry (bf16 logits, their fp32
  copy, the fp32 log-softmax); a chunked loss holds `LOSS_CHUNK_COPIES` fp32 copies of one chunk.
- transient: the largest dequantized matrix (bf16), alive with the recompute (the loss and a layer's
  backward never run at once, so the larger of loss and recompute+dequantized counts) plus, when the base
  is sharded or offloaded, two layers' NF4 bytes gathered (the current layer and FSDP2's prefetch).
- overhead: CUDA context and library workspaces (`CUDA_CONTEXT_GIB`, outside the caching allocator)
  and fragmentation (`FRAGMENTATION` of the allocated peak). Both are assumptions still to be measured.

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
from qdora.options import LOSS, METHOD, OFFLOAD, offloads_activations, offloads_params, select_targets

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.75  # CUDA 12/13 context + cuBLAS workspace on Hopper/Ada: ~0.5-0.8 GiB (assumed)
FRAGMENTATION = 0.05  # caching-allocator slack over the allocated peak (assumed, to be measured)
LOSS_CHUNK_COPIES = 3  # fp32 logits chunk, its softmax/gradient, and a bf16 copy rounded up
FULL_LOSS_BYTES = 10  # per token per vocab entry with transformers' default loss (see module doc)


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

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_paths(self) -> list[str]:
        """Module paths of every decoder-block linear, as a Llama checkpoint names them (for --target)."""
        return [f"model.layers.{n}.{'self_attn' if name.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}"
                f".{name}" for n in range(self.layers) for name in self.linears()]

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
                "o_proj": (h, self.q_dim), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


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
        s = self.settings
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        lines = [
            f"qdora plan: {s['gpus']} GPU(s) x {self.gpu_mem_bytes / GIB:g} GiB, seq {s['seq_len']}, "
            f"micro-batch {s['micro_batch']}, r={s['rank']} {s['method']}, target {s['target']}, "
            f"offload {s['offload']}, loss {s['loss']}",
            f"  quantized base shard    {g(self.base)}   (NF4 + absmax + 2nd-level stats; embeddings/lm_head bf16)",
            f"  adapters+grads+AdamW    {g(self.adapters)}   ({self.details['adapter_params']:,} params)",
            f"  checkpointed hiddens    {g(self.checkpoints)}",
            f"  layer recompute         {g(self.recompute)}",
            f"  logits / loss           {g(self.logits)}   (the larger of this and recompute+dequantized counts)",
            f"  transients              {g(self.transient)}",
            f"  = allocated peak        {g(self.allocated_bytes)}",
            f"  context+fragmentation   {g(self.overhead)}",
            f"  = total per GPU         {g(self.total_bytes)}",
        ]
        if self.fits:
            lines.append(f"fits: {self.total_bytes / GIB:.1f} GiB <= {self.gpu_mem_bytes / GIB:g} GiB")
        else:
            lines.append(f"does not fit: {self.total_bytes / GIB:.1f} GiB > {self.gpu_mem_bytes / GIB:g} GiB; "
                         + (f"fits with {self.suggestion['flags']} ({self.suggestion['total_gib']:.1f} GiB)"
                            if self.suggestion else "no offload/micro-batch/sequence setting makes it fit"))
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
              d["vocab_size"], bool(d.get("tie_word_embeddings", False)))
    if min(s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) < 1:
        raise QdoraError(f"model config has a non-positive size: {s}")
    return s


def load_config(model: str, revision: str | None = None):
    """A model folder with config.json, a config.json file, a preset name (llama-3-70b, 8b, ...), or a Hub
    repository id `org/name` (only its config.json is fetched, at `revision`)."""
    from qdora.io.hub import looks_like_repo_id, resolve_model
    from qdora.tools.presets import preset_config

    path = Path(model)
    if path.is_file():
        if revision:
            raise QdoraError(f"--revision {revision} applies to Hub models, but {model} is a local file")
    elif path.is_dir() or "/" in model and looks_like_repo_id(model):
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
    """Adapter parameters on the linears at `paths` (Shape.linear_paths)."""
    linears = shape.linears()
    return sum(rank * (i + o) + (o if method == "dora" else 0)
               for o, i in (linears[p.rsplit(".", 1)[-1]] for p in paths))


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
    t, h, q, k, i = tokens, shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    attn = h + (q + k) + k + 2 * q
    mlp = h + 3 * i + 3 * i + 2 * h
    if method == "dora":
        attn += (q + 2 * k) + h
        mlp += 2 * i
    return t * (act_bytes * (attn + mlp) + 2 * 4 * h)


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
    adapter_bytes_per_elem: int = 4,
    dtype_bytes: int = 2,
    suggest: bool = True,
) -> MemoryPlan:
    """Per-GPU memory of a QDoRA run (see the module docstring for each term)."""
    shape = config if isinstance(config, Shape) else shape_from_config(config)
    _check(gpus, gpu_mem_gib, seq_len, rank, micro_batch, method, offload, loss, loss_chunk)
    targets = select_targets(target, shape.linear_paths(), "a Llama-shaped model")
    tokens = micro_batch * seq_len
    offload_params = offloads_params(offload)
    offload_acts = offloads_activations(offload)

    shardable = replicated = 0
    for o, i in shape.linears().values():
        sh, rep = nf4_bytes(o, i)
        shardable += sh
        replicated += rep
    layer_nf4 = shardable
    shardable *= shape.layers
    replicated *= shape.layers
    dense = (shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden)
    dense_bytes = dense * dtype_bytes
    base = replicated + (0 if offload_params else math.ceil((shardable + dense_bytes) / gpus))

    n_adapter = adapter_param_count(shape, rank, method, targets)
    adapters = 0 if offload_params else math.ceil(n_adapter * 4 * adapter_bytes_per_elem / gpus)

    boundary = tokens * shape.hidden * dtype_bytes
    checkpoints = (2 if offload_acts else shape.layers) * boundary
    recompute = layer_recompute_bytes(shape, tokens, method, dtype_bytes)
    if loss == "full":
        logits = FULL_LOSS_BYTES * tokens * shape.vocab
    else:
        logits = LOSS_CHUNK_COPIES * 4 * min(loss_chunk, tokens) * shape.vocab
    largest = max(o * i for o, i in shape.linears().values())
    dequantized = largest * dtype_bytes
    transient = dequantized + (2 * layer_nf4 if (gpus > 1 or offload_params) else 0)

    allocated = base + adapters + checkpoints + max(recompute + dequantized, logits) + transient - dequantized
    overhead = int(CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * allocated)
    total = allocated + overhead
    settings = dict(gpus=gpus, gpu_mem_gib=gpu_mem_gib, seq_len=seq_len, rank=rank, micro_batch=micro_batch,
                    method=method, offload=offload, target=target, loss=loss, loss_chunk=loss_chunk)
    details = dict(nf4_shardable_total=shardable, nf4_replicated=replicated, dense_frozen_total=dense_bytes,
                   adapter_params=n_adapter, checkpoint_per_layer=boundary, largest_dequantized=largest * 2,
                   layer_nf4=layer_nf4)
    plan = MemoryPlan(base, adapters, checkpoints, recompute, logits, transient, overhead, allocated, total,
                      int(gpu_mem_gib * GIB), total <= gpu_mem_gib * GIB, settings, details)
    if not plan.fits and suggest:
        plan.suggestion = _cheapest_fit(shape, settings, adapter_bytes_per_elem, dtype_bytes)
    return plan


def _cheapest_fit(shape: Shape, settings: dict, adapter_bytes: int, dtype_bytes: int) -> dict | None:
    """The least costly change that fits: keep the sequence length if at all possible, then offload as
    little as possible, then keep the micro batch as large as possible (gradient accumulation makes up
    the rest)."""
    s = settings
    offloads = OFFLOAD.values[OFFLOAD.values.index(s["offload"]):]
    seqs, L = [], s["seq_len"]
    while L >= 256 or not seqs:
        seqs.append(L)
        L //= 2
    mbs, b = [], s["micro_batch"]
    while b >= 1:
        mbs.append(b)
        b //= 2
    for si, seq in enumerate(seqs):
        for off in offloads:
            for mb in mbs:
                if (si, off, mb) == (0, s["offload"], s["micro_batch"]):
                    continue
                kw = dict(s, seq_len=seq, offload=off, micro_batch=mb)
                p = plan_memory(shape, gpus=kw["gpus"], gpu_mem_gib=kw["gpu_mem_gib"], seq_len=seq, rank=kw["rank"],
                                micro_batch=mb, method=kw["method"], offload=off, target=kw["target"],
                                loss=kw["loss"], loss_chunk=kw["loss_chunk"], adapter_bytes_per_elem=adapter_bytes,
                                dtype_bytes=dtype_bytes, suggest=False)
                if p.fits:
                    flags = [f"--offload {off}"] if off != s["offload"] else []
                    flags += [f"--micro-batch {mb}"] if mb != s["micro_batch"] else []
                    flags += [f"--seq-len {seq}"] if seq != s["seq_len"] else []
                    return dict(flags=" ".join(flags), offload=off, micro_batch=mb, seq_len=seq,
                                total_gib=p.total_bytes / GIB)
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


