"""Stream a local safetensors checkpoint into an NF4-quantized, adapted model without the full-precision model.

The model is built on the meta device, adapted there (empty NF4/QDoRA layers), optionally sharded by a
callback (FSDP2 `fully_shard`, still on meta), then materialised empty on the target device. Each tensor
is then read from the (possibly sharded, `model.safetensors.index.json`) checkpoint with `safe_open`, one
at a time: block linears are quantized to NF4 on the target device and only this rank's rows are kept;
everything else (embeddings, norms, lm_head) is cast to the compute dtype. Peak host memory is about one
full-precision tensor plus the quantized model (or this rank's shard of it).

Every rank reads and quantizes the *whole* tensor of a linear: NF4's double quantization computes its
second-level statistics (absmax2, offset) over all blocks of the weight, so quantizing a row slice alone
would give different bytes than the single-process model. The full tensor lives only while it is quantized.

Non-persistent buffers (the rotary `inv_freq`, Gemma's embedding scale) are not in the checkpoint; they
are recomputed from the config after `to_empty` (see `_rebuild_buffers`). Tied embeddings: when the
checkpoint has no `lm_head.weight`, the lm_head is filled
from the embedding (it is frozen, so a copy is as good as a tie).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from qdora.core.adapt import AdapterSpec, AdaptReport, adapt_model, adapter_layers, init_adapters
from qdora.core.host_embedding import HostEmbedding
from qdora.core.layer import NF4Linear, QDoRALinear
from qdora.core.moe_families import moe_family_of
from qdora.core.nf4 import NF4Weight, nf4_from_weight
from qdora.core.prequantized import bnb_format, companion_of, fill_prequantized, quantized_weights, read_parts
from qdora.core.shards import fill_param, whole
from qdora.errors import QdoraError
from qdora.io.weights import WeightReader

log = logging.getLogger("qdora.core.load")


def open_checkpoint(model_dir: str | Path) -> WeightReader:
    """The model folder's safetensors tensors (single file or index-sharded), read one at a time.

    `WeightReader` gives each tensor its own short-lived memory map: a map held open keeps every
    page read so far in this process's resident set, growing RSS to the whole file.
    """
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise QdoraError(f"{model_dir} is not a model folder: config.json is missing")
    return WeightReader(d)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed multi-MB blocks for reuse otherwise)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (probe: non-glibc libcs lack it)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def iter_checkpoint(reader: WeightReader) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, loader) per tensor in file order; the loader reads that tensor only."""
    for name in reader.keys():  # noqa: SIM118 (file order; the reader is not iterable)
        yield name, (lambda n=name: reader.get(n))
        _release_freed_memory()


def meta_model(model_dir: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of `model_dir`'s config on the meta device: its module tree, no memory, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as e:
        raise QdoraError(f"cannot read the model config in {model_dir}: {e}") from e
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
        except (ValueError, KeyError) as e:
            raise QdoraError(f"{model_dir}: transformers cannot build a causal LM from this config: {e}") from e


def build_meta_model(model_dir: str | Path, spec: AdapterSpec, compute_dtype: torch.dtype):
    """The causal LM on the meta device, adapted (empty NF4 + adapter layers): no memory is used."""
    model = meta_model(model_dir, compute_dtype)
    report = adapt_model(model, spec)
    return model, report


@torch.no_grad()
def fill_nf4(target: NF4Weight, weight: torch.Tensor, device: torch.device) -> None:
    """Quantize a full-precision weight on `device` and put (this rank's rows of) it into `target`."""
    q = nf4_from_weight(weight.to(device=device, dtype=torch.float32), target.spec.double_quant,
                        target.storage_dtype)
    fill_param(target.packed, q.packed.data)
    fill_param(target.absmax, q.absmax.data)
    for name in ("absmax2", "code2", "offset", "code", "row_norm_sq"):
        setattr(target, name, getattr(q, name).to(device))


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers `to_empty` leaves uninitialised, from the config.

    Rotary modules (one `inv_freq`, or Gemma 3's one per layer type) are re-created on the target
    device, as transformers' own `_init_weights` does; scaled embeddings (Gemma) get their scalar
    `embed_scale` back, in the buffer's dtype as transformers stores it. Anything else is refused by name.
    """
    for path, module in model.named_modules():
        lost = set(getattr(module, "_non_persistent_buffers_set", set()))
        if not lost:
            continue
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "config"):
            _recreate_rotary(module, device)
            continue
        if lost == {"embed_scale"} and hasattr(module, "scalar_embed_scale"):
            with torch.no_grad():
                module.embed_scale.copy_(torch.tensor(float(module.scalar_embed_scale)))
            continue
        raise QdoraError(f"{path} ({type(module).__name__}) has buffers that are not saved in checkpoints "
                         f"({', '.join(sorted(lost))}) and that qdora does not know how to recompute: "
                         "this model family is not supported")


def _recreate_rotary(module: nn.Module, device: torch.device) -> None:
    with torch.device(device):
        fresh = type(module)(config=module.config)
    for name, buf in fresh.named_buffers(recurse=False):
        module._buffers[name] = buf.to(device)
    for attr, value in vars(fresh).items():  # attention_scaling (per layer type), cached lengths
        if not attr.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(module, attr, value)


def load_model(
    model_dir: str | Path,
    spec: AdapterSpec,
    device: torch.device | str,
    compute_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[nn.Module, AdaptReport]:
    """The adapted, NF4-quantized causal LM, streamed from `model_dir` onto `device`.

    Adapter parameters keep `spec.adapter_dtype`; other float tensors are loaded in `compute_dtype`. Raises
    QdoraError for missing files, unknown/missing tensors, bad shapes. (To shard with FSDP2: build the meta
    model with `build_meta_model`, shard it, then `load_weights`.) A checkpoint saved pre-quantized by
    bitsandbytes (NF4) is read as it is (`qdora.core.prequantized`): its bytes become the NF4 storage
    unchanged; `spec.double_quant` must be the checkpoint's (`base_double_quant`).
    """
    open_checkpoint(model_dir)  # a folder that is no model: this clear message, before building anything
    bnb = bnb_format(model_dir)
    if bnb is not None and bnb.double_quant != spec.double_quant:
        raise QdoraError(f"{model_dir} is NF4 {'with' if bnb.double_quant else 'without'} double quantization: "
                         f"load it with AdapterSpec(double_quant={bnb.double_quant}) (see base_double_quant)")
    model, report = build_meta_model(model_dir, spec, compute_dtype)
    load_weights(model, model_dir, device, seed)
    return model, report


def load_weights(model: nn.Module, model_dir: str | Path, device: torch.device | str, seed: int = 0) -> None:
    """Materialise an adapted meta model (plain, or already FSDP2-sharded: each rank fills only its rows) on
    `device` from `model_dir`'s safetensors, then init its adapters as `adapt_model(..., seed)` would."""
    device = torch.device(device)
    reader = open_checkpoint(model_dir)
    bnb = bnb_format(model_dir)
    quantized = quantized_weights(reader.keys()) if bnb is not None else set()
    model.to_empty(device=device)
    _rebuild_buffers(model, device)

    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    loaded: set[str] = set()
    unknown: list[str] = []
    embed_key = None
    host_embedding = next((m for m in modules.values() if isinstance(m, HostEmbedding)), None)
    family = moe_family_of(model)
    for ckpt_name, read in iter_checkpoint(reader):
        name = family.to_model(ckpt_name) if family is not None else ckpt_name
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if companion_of(ckpt_name) in quantized:  # read with its weight
            continue
        if ckpt_name in quantized:  # pre-quantized bitsandbytes NF4: the bytes as they are
            parts = read_parts(reader, ckpt_name)
            if isinstance(module, (QDoRALinear, NF4Linear)):
                fill_prequantized(module.base, parts, device)
                loaded.update(f"{owner}.base.{p}" for p in ("packed", "absmax"))
            elif name in params:  # a linear qdora keeps in full precision: its dequantized weight
                fill_param(params[name], parts.dequantize(torch.float32, device))
                loaded.add(name)
            else:
                unknown.append(name)
        elif isinstance(module, HostEmbedding) and leaf == "weight":  # the input embedding kept on the host
            module.set_table(read())
            loaded.add(name)
        elif isinstance(module, NF4Weight) and leaf == "weight":  # one expert's projection (NF4Experts)
            fill_nf4(module, read(), device)
            loaded.update(f"{owner}.{p}" for p in ("packed", "absmax"))
        elif isinstance(module, (QDoRALinear, NF4Linear)) and leaf == "weight":
            fill_nf4(module.base, read(), device)
            loaded.update(f"{owner}.base.{p}" for p in ("packed", "absmax"))
        elif isinstance(module, (QDoRALinear, NF4Linear)) and leaf == "bias":
            fill_param(module.bias, read())
            loaded.add(name)
        elif name in params:
            fill_param(params[name], read())
            loaded.add(name)
            if isinstance(module, nn.Embedding):
                embed_key = name
        elif name in buffers:
            fill_param(buffers[name], read())
            loaded.add(name)
        else:
            unknown.append(ckpt_name)
    if unknown:
        log.warning("ignored %d checkpoint tensors the model does not have (e.g. %s)", len(unknown), unknown[0])
    head = getattr(model, "lm_head", None)
    tied = not {"lm_head.weight", "lm_head.base.packed"} & loaded  # the checkpoint has no head of its own
    if tied and host_embedding is not None and host_embedding.weight.device.type != "meta":
        embed = host_embedding.weight  # the table on the host (frozen: a copy is as good as a tie)
    elif tied and embed_key is not None:
        embed = None if head is not None and getattr(head, "weight", None) is params[embed_key] \
            else whole(params[embed_key])
        if embed is None:  # still tied (no sharding, no to_empty copy): nothing to fill
            loaded.add("lm_head.weight")
    else:
        embed = None
    if embed is not None and isinstance(head, NF4Linear):
        fill_nf4(head.base, embed, device)
        loaded.update(f"lm_head.base.{p}" for p in ("packed", "absmax"))
    elif embed is not None and isinstance(head, nn.Linear):
        fill_param(head.weight, embed)
        loaded.add("lm_head.weight")
    if host_embedding is not None and host_embedding.weight.device.type == "meta":
        raise QdoraError(f"{model_dir}: the checkpoint has no input embedding")
    adapter_names = {f"{p}.{a}" for p, layer in adapter_layers(model).items() for a in layer.adapter_tensors()}
    missing = [n for n in params if n not in loaded and n not in adapter_names]
    if missing:
        raise QdoraError(f"{model_dir}: the checkpoint lacks {len(missing)} tensors the model needs, "
                         f"e.g. {', '.join(missing[:3])}")
    init_adapters(model, seed)
