"""How many bytes an export will write, known before it starts (for the free-space check).

The f16/bf16/f32/q8_0 file is exact up to its metadata (tensor data with alignment padding, plus the
tensor table; the vocabulary is left out, so this is a lower bound a few MB short at most). A llama.cpp
quantization is estimated from its main block type (Q4_K_M -> Q4_K, 4.5 bits per weight) applied to
every 2-D tensor: K-quant mixes keep a few tensors wider, so the true file is somewhat larger. Both
errs on the small side on purpose: a free-space refusal must never stop an export that would fit.
"""

from __future__ import annotations

import math

import gguf

from qdora.export.gguf_tensors import TensorPlan

ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT
_INFO_BYTES = 8 + 4 + 8  # name length, n_dims, type and offset besides the name and the dims


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def gguf_bytes(plans: list[TensorPlan]) -> int:
    """Lower bound of the GGUF file `plans` become: tensor data, padding and tensor table."""
    table = sum(len(p.name) + 8 * len(p.shape) + _INFO_BYTES for p in plans)
    return _padded(table) + sum(_padded(p.nbytes) for p in plans)


def _bits_per_weight(qtype: str) -> float:
    """Q4_K_M -> 4.5 (Q4_K's block size); a name gguf does not know -> its leading digit (IQ2_M -> 2)."""
    name = qtype.upper()
    while name:
        if name in gguf.GGMLQuantizationType.__members__:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
            return 8 * size / block
        name = name.rpartition("_")[0]
    digits = [c for c in qtype if c.isdigit()]
    return float(digits[0]) if digits else 16.0


def quantized_bytes(plans: list[TensorPlan], qtype: str) -> int:
    """Estimated size of llama.cpp's `qtype` quantization of the GGUF `plans` describe."""
    bpw = _bits_per_weight(qtype)
    total = 0
    for p in plans:
        n = math.prod(p.shape)
        total += int(n * bpw / 8) if len(p.shape) >= 2 else 4 * n
    return total
