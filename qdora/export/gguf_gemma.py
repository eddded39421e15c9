"""Gemma 2 and Gemma 3 as llama.cpp reads them (its `conversion/gemma.py` and `src/models/gemma*.cpp`).

What llama.cpp fixes instead of reading, and so what a checkpoint must match to run there as in transformers:
the local/global layer pattern (Gemma 2: every other layer local, starting with the first; Gemma 3: five
local then one global), the query scale (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B shapes,
which llama.cpp recognises by their layer count), the embedding scale sqrt(hidden), and GELU-tanh. Gemma 3's
local layers use their own rope base (`rope.freq_base_swa`) and no rope scaling. Norm weights are stored as
w - 1 in HF (Gemma's RMSNorm multiplies by 1 + w); `ArchRules.norm_shift` writes w.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gguf

from qdora.errors import QdoraError
from qdora.export.gguf_rope import rope_type_of

if TYPE_CHECKING:
    from qdora.export.gguf_config import ModelSpec

GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
# llama.cpp's model-size detection by layer count: these shapes are its "27B", scaled by hidden / heads.
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}  # llama.cpp's set_swa_pattern: layer i is local unless i % n == n - 1


def _expected_layer_types(spec: ModelSpec) -> list[str]:
    period = _SWA_PERIOD[spec.arch]
    return ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(spec.n_layer)]


def _check_common(spec: ModelSpec) -> None:
    cfg = spec.cfg
    types = cfg.get("layer_types")
    if types is not None and list(types) != _expected_layer_types(spec):
        period = _SWA_PERIOD[spec.arch]
        raise QdoraError(
            f"{spec.arch} layer_types {types} differ from the pattern llama.cpp assumes (every {period}th layer "
            "global, the others sliding-window): llama.cpp would attend differently"
        )
    scalar = cfg.get("query_pre_attn_scalar", spec.head_dim)
    big = spec.n_layer == _LAYERS_27B[spec.arch]
    expected = spec.n_embd // spec.n_head if big else spec.head_dim
    if scalar != expected:
        raise QdoraError(
            f"query_pre_attn_scalar={scalar} is not what llama.cpp uses for a {spec.n_layer}-layer {spec.arch} "
            f"({expected}: {'hidden / heads' if big else 'head_dim'}); its attention would be scaled differently"
        )
    if not spec.tied_embeddings:
        raise QdoraError(f"{spec.arch} with tie_word_embeddings=false: llama.cpp's Gemma graphs read the "
                         "output matrix from the token embedding (every Gemma checkpoint ties them)")


def check_gemma2(spec: ModelSpec) -> None:
    _check_common(spec)


def check_gemma3(spec: ModelSpec) -> None:
    _check_common(spec)
    cfg = spec.cfg
    if cfg.get("attn_logit_softcapping") is not None:
        raise QdoraError("Gemma 3 with attn_logit_softcapping: llama.cpp's gemma3 has no attention soft-capping")
    if cfg.get("final_logit_softcapping") is not None:
        raise QdoraError("Gemma 3 with final_logit_softcapping: llama.cpp's sliding-window gemma3 graph does not "
                         "soft-cap the logits")
    local = local_rope(spec)
    local_type = rope_type_of(local)
    if local_type != "default":
        raise QdoraError(f"Gemma 3 local-layer rope type {local_type!r}: llama.cpp scales only the global layers")


def local_rope(spec: ModelSpec) -> dict:
    """Gemma 3's sliding-layer rope settings (transformers 5 `rope_parameters`, or the older top-level key)."""
    params = spec.cfg.get("rope_parameters") or {}
    if "sliding_attention" in params:
        return dict(params["sliding_attention"] or {})
    return {"rope_type": "default", "rope_theta": spec.cfg.get("rope_local_base_freq", 10000.0)}


def _sliding_window(spec: ModelSpec) -> int:
    window = spec.cfg.get("sliding_window")
    if not window:
        raise QdoraError(f"{spec.arch} config has no sliding_window")
    return int(window)


def gemma2_hparams(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    cfg = spec.cfg
    if cfg.get("attn_logit_softcapping") is not None:
        writer.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
    if cfg.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    writer.add_sliding_window(_sliding_window(spec))


def gemma3_hparams(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    writer.add_sliding_window(_sliding_window(spec))
    writer.add_rope_freq_base_swa(float(local_rope(spec).get("rope_theta", 10000.0)))
