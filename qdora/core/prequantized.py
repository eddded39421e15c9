"""Checkpoints saved already quantized by bitsandbytes (NF4, `*-bnb-4bit` repos), read as they are.

transformers' `save_pretrained` of a `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`
model stores, for each quantized linear `<p>.weight`, the packed 4-bit bytes (flat, row-major) and its
`QuantState` as companion tensors: `<p>.weight.absmax`, `.quant_map`, with double quantization also
`.nested_absmax`, `.nested_quant_map`, plus `.quant_state.bitsandbytes__nf4` (JSON bytes: shape,
blocksize, dtype, nested offset). bitsandbytes' own `QuantState.from_dict` parses them here, and the
bytes go into qdora's row-laid-out NF4 storage unchanged: no dequantize/requantize round trip, so the
base is bit for bit the one the checkpoint holds. Such a checkpoint has no full-precision weights, so a
merge can only use the dequantized base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qdora.core.nf4 import (
    BLOCKSIZE,
    NESTED_BLOCKSIZE,
    NF4Spec,
    NF4Weight,
    _as_storage,
    check_quantizable,
    dequantize_nf4,
)
from qdora.errors import QdoraError

STATE_SUFFIX = "quant_state.bitsandbytes__"
COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", STATE_SUFFIX + "nf4", STATE_SUFFIX + "fp4")


@dataclass(frozen=True)
class BnbFormat:
    """How a pre-quantized checkpoint was quantized (from its config.json's quantization_config)."""

    double_quant: bool


def bnb_format(model_dir: str | Path) -> BnbFormat | None:
    """The checkpoint's bitsandbytes 4-bit format, None for a full-precision checkpoint; QdoraError for a
    quantization qdora cannot read (8-bit, fp4, other methods)."""
    path = Path(model_dir) / "config.json"
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError) as e:
        raise QdoraError(f"cannot read {path}: {e}") from e
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise QdoraError(f"{model_dir} is quantized with {method!r}: qdora reads full-precision checkpoints and "
                         "bitsandbytes 4-bit NF4 ones")
    if qc.get("load_in_8bit") or not qc.get("load_in_4bit", True):
        raise QdoraError(f"{model_dir} is a bitsandbytes 8-bit checkpoint: qdora reads full-precision checkpoints "
                         "and bitsandbytes 4-bit NF4 ones")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise QdoraError(f"{model_dir} is quantized to bitsandbytes {qc.get('bnb_4bit_quant_type', 'fp4')}: qdora "
                         "reads NF4 (bnb_4bit_quant_type='nf4') only")
    return BnbFormat(double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)))


def base_double_quant(model_dir: str | Path) -> bool:
    """Double quantization of the base as qdora will hold it: the checkpoint's own if pre-quantized, else on."""
    fmt = bnb_format(model_dir)
    return True if fmt is None else fmt.double_quant


def quantized_weights(keys) -> set[str]:
    """The `<p>.weight` keys stored as bitsandbytes 4-bit bytes (those with a packed quant state)."""
    keys = set(keys)
    return {k for k in keys if k.endswith(".weight") and any(f"{k}.{STATE_SUFFIX}{t}" in keys for t in ("nf4", "fp4"))}


def companion_of(key: str) -> str | None:
    """`<p>.weight` for a quant-state companion tensor `<p>.weight.absmax` etc., else None."""
    head, sep, tail = key.rpartition(".weight.")
    return head + ".weight" if sep and tail in COMPANIONS else None


@dataclass
class NF4Parts:
    """One pre-quantized weight in qdora's layout: row-laid-out bytes, fp32 statistics, and its spec."""

    spec: NF4Spec
    packed: torch.Tensor  # uint8 [out, in/2]
    absmax: torch.Tensor  # uint8 [out, in/64] (double quant) or fp32 bytes [out, 4*in/64]
    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The [out, in] weight, by bitsandbytes' kernel (what the checkpoint's model computes with)."""
        t = [x.to(device) for x in (self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.code)]
        return dequantize_nf4(*t, self.spec, dtype)


def read_parts(reader, key: str) -> NF4Parts:
    """The weight `key` of a pre-quantized checkpoint (`reader`: a WeightReader), parsed by bitsandbytes."""
    from bitsandbytes.functional import QuantState

    qs_dict = {f"{key}.{c}": reader.get(f"{key}.{c}") for c in COMPANIONS if f"{key}.{c}" in reader}
    try:
        qs = QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    except (ValueError, KeyError, AssertionError, json.JSONDecodeError) as e:
        raise QdoraError(f"{key}: unreadable bitsandbytes quant state ({e})") from e
    if qs.quant_type != "nf4":
        raise QdoraError(f"{key} is quantized to {qs.quant_type}: qdora reads NF4 only")
    if qs.shape is None or len(qs.shape) != 2:
        raise QdoraError(f"{key}: the quant state has no 2-D shape ({qs.shape})")
    out, inn = int(qs.shape[0]), int(qs.shape[1])
    check_quantizable(out, inn)
    double = qs.state2 is not None
    if qs.blocksize != BLOCKSIZE or (double and qs.state2.blocksize != NESTED_BLOCKSIZE):
        raise QdoraError(f"{key}: NF4 block size {qs.blocksize} (nested {getattr(qs.state2, 'blocksize', None)}); "
                         f"qdora reads the bitsandbytes default {BLOCKSIZE} (nested {NESTED_BLOCKSIZE})")
    packed = reader.get(key).contiguous().view(torch.uint8).reshape(-1)
    if packed.numel() != out * inn // 2:
        raise QdoraError(f"{key}: {packed.numel()} packed bytes, but its shape {out}x{inn} needs {out * inn // 2}")
    bpr = inn // BLOCKSIZE
    if double:
        absmax = qs.absmax.contiguous().view(torch.uint8).reshape(out, bpr)
        absmax2, code2 = qs.state2.absmax.float(), qs.state2.code.float()
        offset = qs.offset.float().reshape(1)
    else:
        absmax = qs.absmax.float().contiguous().view(torch.uint8).reshape(out, 4 * bpr)
        absmax2, code2, offset = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    return NF4Parts(NF4Spec(out, inn, double), packed.reshape(out, inn // 2), absmax, absmax2, code2, offset,
                    qs.code.float())


def logical_shape(reader, key: str) -> tuple[int, ...]:
    """The [out, in] shape of a pre-quantized weight, from its quant state (no tensor data read)."""
    state = reader.get(f"{key}.{STATE_SUFFIX}nf4") if f"{key}.{STATE_SUFFIX}nf4" in reader else None
    if state is None:
        raise QdoraError(f"{key}: not an NF4 weight")
    return tuple(json.loads(bytes(state.tolist()).decode())["shape"])


@torch.no_grad()
def fill_prequantized(target: NF4Weight, parts: NF4Parts, device: torch.device) -> None:
    """Put a pre-quantized weight's bytes (this rank's rows under FSDP2) and statistics into `target`."""
    from qdora.core.shards import fill_param

    if target.shape != (parts.spec.out_features, parts.spec.in_features):
        raise QdoraError(f"shape mismatch while loading: expected {target.shape}, the checkpoint has "
                         f"{(parts.spec.out_features, parts.spec.in_features)}")
    if target.spec.double_quant != parts.spec.double_quant:
        raise QdoraError("the checkpoint's double quantization differs from the model's NF4 layers "
                         f"({parts.spec.double_quant} vs {target.spec.double_quant})")
    fill_param(target.packed, _as_storage(parts.packed, target.storage_dtype))
    fill_param(target.absmax, _as_storage(parts.absmax, target.storage_dtype))
    for name in ("absmax2", "code2", "offset", "code"):
        setattr(target, name, getattr(parts, name).to(device))
    target.row_norm_sq = parts.dequantize(torch.float32, device).pow(2).sum(dim=1)
