"""Rope tensors llama.cpp reads from the file instead of computing: Llama 3.1's per-frequency factors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import gguf
import numpy as np

if TYPE_CHECKING:
    from qdora.export.gguf_config import ModelSpec

ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def rope_type_of(params: dict) -> str:
    """A rope-parameters dict's type as transformers spells it in either config generation ("default": unscaled)."""
    return params.get("rope_type", params.get("type", "default")) or "default"


def llama3_rope_factors(spec: ModelSpec) -> list[float] | None:
    """Per-frequency divisors for Llama 3.1's rope scaling (llama.cpp's `rope_freqs` tensor), else None.

    Same rule as transformers' `_compute_llama3_parameters`: long wavelengths are slowed by `factor`,
    short ones kept, the band between interpolated. The original context comes from the rope settings,
    as transformers reads it (llama.cpp's converter reads a top-level key and falls back to 8192).
    """
    rope = spec.rope
    if rope.get("rope_type") != "llama3":
        return None
    dim = spec.head_dim
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, dim, 2):
        freq = 1.0 / (spec.rope_theta ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


def llama3_tensors(spec: ModelSpec) -> dict[str, np.ndarray]:
    """`rope_freqs.weight` for Llama 3.1-style scaling, nothing otherwise."""
    factors = llama3_rope_factors(spec)
    return {} if factors is None else {ROPE_FREQS: np.asarray(factors, dtype=np.float32)}
