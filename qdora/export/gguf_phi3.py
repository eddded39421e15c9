"""Phi-3 / Phi-3.5 / Phi-4-mini as llama.cpp reads them (its `conversion/phi.py`, arch `phi3`).

The fused `qkv_proj` and `gate_up_proj` go in as they are (llama.cpp splits them in its graph); partial
rotary becomes a rope dimension count below head_dim; longrope's per-frequency divisors become the
`rope_factors_short` / `rope_factors_long` tensors and its attention factor a key. llama.cpp picks the long
factors when its context exceeds the original one, transformers when the sequence does, so the two agree
for sequences within the original context run in a context no larger than it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import gguf
import numpy as np

from qdora.errors import QdoraError

if TYPE_CHECKING:
    from qdora.export.gguf_config import ModelSpec


def _original_context(spec: ModelSpec) -> int:
    return int(spec.rope.get("original_max_position_embeddings")
               or spec.cfg.get("original_max_position_embeddings") or spec.n_ctx_train)


def check_phi3(spec: ModelSpec) -> None:
    if spec.rope["rope_type"] != "longrope":
        return
    half = spec.rope_dim // 2
    for key in ("short_factor", "long_factor"):
        factors = spec.rope.get(key)
        if not isinstance(factors, list) or len(factors) != half:
            raise QdoraError(f"longrope {key} must list {half} numbers (rotary dims / 2), "
                             f"found {len(factors) if isinstance(factors, list) else factors!r}")
    if spec.rope.get("attention_factor") is not None:
        raise QdoraError("longrope with an explicit attention_factor is not supported for export "
                         "(llama.cpp's converter derives it from the context lengths)")


def phi3_hparams(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    writer.add_rope_scaling_orig_ctx_len(_original_context(spec))
    writer.add_sliding_window(int(spec.cfg.get("sliding_window") or 0))
    if spec.rope["rope_type"] == "longrope":
        scale = spec.n_ctx_train / _original_context(spec)
        factor = math.sqrt(1 + math.log(scale) / math.log(_original_context(spec))) if scale > 1.0 else 1.0
        writer.add_rope_scaling_attn_factors(factor)


def phi3_tensors(spec: ModelSpec) -> dict[str, np.ndarray]:
    if spec.rope["rope_type"] != "longrope":
        return {}
    names = gguf.TENSOR_NAMES
    return {
        names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": np.asarray(spec.rope["long_factor"], np.float32),
        names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": np.asarray(spec.rope["short_factor"], np.float32),
    }
