"""Read a merged Hugging Face model folder and describe it the way llama.cpp's GGUF metadata needs.

Kept apart from the tensor and tokenizer code so that every input check happens first, before a single
byte of the output file is written.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from qdora.errors import QdoraError

log = logging.getLogger(__name__)

# HF model_type -> GGUF architecture. Mistral (v0.1-v0.3 style) is a Llama as llama.cpp sees it.
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


@dataclass
class ModelSpec:
    """The hyperparameters of one model, as llama.cpp names them."""

    model_dir: Path
    model_type: str
    arch: str  # GGUF architecture: "llama" or "qwen2"
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any] = field(default_factory=dict)  # rope_scaling / rope_parameters, type normalised
    tied_embeddings: bool = False
    vocab_rows: int = 0
    name: str = ""

    @property
    def permute_qk(self) -> bool:
        """llama.cpp's llama arch rotates adjacent pairs, HF Llama/Mistral rotate halves; qwen2 matches HF."""
        return self.arch == "llama"


def check_model_dir(model_dir: Path) -> None:
    """Reject what is not a merged safetensors checkpoint, with one message that says what it is."""
    if not model_dir.is_dir():
        raise QdoraError(f"{model_dir} is not a folder: pass the merged model folder (from `qdora merge`)")
    if (model_dir / "adapter_config.json").is_file():
        raise QdoraError(
            f"{model_dir} holds an adapter (adapter_config.json), not a merged model: "
            f"export it with --adapter {model_dir} (merges on the way), or run `qdora merge` first"
        )
    if not (model_dir / "config.json").is_file():
        raise QdoraError(f"{model_dir} is not a Hugging Face model folder: it has no config.json")
    if not any(model_dir.glob("*.safetensors")):
        raise QdoraError(f"{model_dir} has no *.safetensors weights (only safetensors checkpoints export)")
    if not (model_dir / "tokenizer.json").is_file():
        raise QdoraError(f"{model_dir} has no tokenizer.json (the GGUF vocabulary is read from it)")


def read_spec(model_dir: Path) -> ModelSpec:
    """Parse config.json (both the `rope_scaling` and transformers 5's `rope_parameters` spellings)."""
    check_model_dir(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise QdoraError(
            f"unsupported architecture {model_type!r} ({', '.join(cfg.get('architectures') or [])}); "
            f"qdora exports {', '.join(SUPPORTED)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise QdoraError(f"hidden_act {cfg['hidden_act']!r} is not supported (llama.cpp uses silu)")
    if cfg.get("mlp_bias"):
        raise QdoraError("mlp_bias=true is not supported for export")
    if model_type == "mistral" and cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get(
        "max_position_embeddings", 0
    ):
        log.warning("sliding_window=%s is ignored by llama.cpp's llama arch: keep prompts within it",
                    cfg["sliding_window"])
    n_head = cfg["num_attention_heads"]
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    rope["rope_type"] = rope_type
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type not in ("default", "llama3", "linear"):
        raise QdoraError(f"rope type {rope_type!r} is not supported for export (default, llama3, linear are)")
    return ModelSpec(
        model_dir=model_dir,
        model_type=model_type,
        arch=SUPPORTED[model_type],
        n_layer=cfg["num_hidden_layers"],
        n_embd=cfg["hidden_size"],
        n_ff=cfg["intermediate_size"],
        n_head=n_head,
        n_head_kv=cfg.get("num_key_value_heads") or n_head,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        n_ctx_train=cfg.get("max_position_embeddings", 4096),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope=rope,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        vocab_rows=cfg["vocab_size"],
        name=model_dir.resolve().name,
    )


def write_hparams(writer: gguf.GGUFWriter, spec: ModelSpec, file_type: gguf.LlamaFileType) -> None:
    """The `general.*` and `<arch>.*` keys llama.cpp reads to build the graph."""
    writer.add_name(spec.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(spec.vocab_rows)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim != spec.n_embd // spec.n_head:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    if spec.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(spec.rope["factor"]))


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
