"""Read a merged Hugging Face model folder and describe it the way llama.cpp's GGUF metadata needs.

Kept apart from the tensor and tokenizer code so that every input check happens first, before a single
byte of the output file is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from qdora.core.families import check_family
from qdora.core.family_config import read_config, text_config
from qdora.errors import QdoraError
from qdora.export.gguf_archs import ARCH_RULES, ArchRules
from qdora.export.gguf_rope import rope_type_of

log = logging.getLogger(__name__)

@dataclass
class ModelSpec:
    """The hyperparameters of one model, as llama.cpp names them."""

    model_dir: Path
    model_type: str
    arch: str  # GGUF architecture (the family's `gguf_arch`): llama, qwen2, qwen3, gemma2, gemma3, phi3
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
    cfg: dict[str, Any] = field(default_factory=dict)  # the (text) config.json, for arch-specific keys
    rope_dim: int = 0  # rotated dimensions per head (partial rotary: fewer than head_dim)

    @property
    def rules(self) -> ArchRules:
        return ARCH_RULES[self.arch]

    @property
    def permute_qk(self) -> bool:
        """llama.cpp's llama arch rotates adjacent pairs, HF Llama/Mistral rotate halves; the others match HF."""
        return self.rules.permute_qk


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
    """Parse config.json (both the `rope_scaling` and transformers 5's `rope_parameters` spellings).

    The family must be exportable (`qdora.core.families`); the arch's own rules then check the settings
    llama.cpp cannot reproduce, before anything is written.
    """
    check_model_dir(model_dir)
    full = read_config(model_dir)
    family = check_family(full, ("export",), command="qdora export")
    cfg = text_config(full)
    rules = ARCH_RULES[family.gguf_arch]
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in rules.hidden_acts:
        raise QdoraError(f"hidden activation {act!r} is not supported for {family.name} export "
                         f"(llama.cpp's {family.gguf_arch} uses {' or '.join(rules.hidden_acts)})")
    if cfg.get("mlp_bias"):
        raise QdoraError("mlp_bias=true is not supported for export")
    if full.get("model_type") == "mistral" and cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get(
        "max_position_embeddings", 0
    ):
        log.warning("sliding_window=%s is ignored by llama.cpp's llama arch: keep prompts within it",
                    cfg["sliding_window"])
    n_head = cfg["num_attention_heads"]
    rope = rope_settings(cfg)
    if rope["rope_type"] not in rules.rope_types:
        raise QdoraError(f"rope type {rope['rope_type']!r} is not supported for {family.name} export "
                         f"({', '.join(rules.rope_types)} are)")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    spec = ModelSpec(
        model_dir=model_dir,
        model_type=family.model_type,
        arch=family.gguf_arch,
        n_layer=cfg["num_hidden_layers"],
        n_embd=cfg["hidden_size"],
        n_ff=cfg["intermediate_size"],
        n_head=n_head,
        n_head_kv=cfg.get("num_key_value_heads") or n_head,
        head_dim=head_dim,
        n_ctx_train=cfg.get("max_position_embeddings", 4096),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope=rope,
        tied_embeddings=bool(full.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        vocab_rows=cfg["vocab_size"],
        name=model_dir.resolve().name,
        cfg=cfg,
        rope_dim=int(head_dim * partial),
    )
    if rope["rope_type"] == "yarn":
        check_yarn(spec)
    rules.check(spec)
    return spec


def rope_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of full-attention layers, `rope_type` normalised ("default" when unscaled).

    transformers 5 writes `rope_parameters`, per layer type for Gemma 3 (`full_attention`,
    `sliding_attention`); older configs write `rope_scaling` and a top-level `rope_theta`.
    """
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in params:
        params = params["full_attention"] or {}
    rope = dict(params)
    rope_type = rope_type_of(rope)
    rope["rope_type"] = "longrope" if rope_type == "su" else rope_type
    return rope


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
    writer.add_rope_dimension_count(spec.rope_dim)
    if spec.head_dim != spec.n_embd // spec.n_head or spec.rules.write_head_dim:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    rope_type = spec.rope["rope_type"]
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(spec.rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(spec.rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(yarn_original_context(spec))
        if spec.rope.get("beta_fast"):
            writer.add_rope_scaling_yarn_beta_fast(float(spec.rope["beta_fast"]))
        if spec.rope.get("beta_slow"):
            writer.add_rope_scaling_yarn_beta_slow(float(spec.rope["beta_slow"]))
    spec.rules.hparams(writer, spec)


def yarn_original_context(spec: ModelSpec) -> int:
    """YaRN's original context as transformers resolves it: a top-level `original_max_position_embeddings`
    first, then the rope settings', then `max_position_embeddings`."""
    for value in (spec.cfg.get("original_max_position_embeddings"),
                  spec.rope.get("original_max_position_embeddings")):
        if value:
            return int(value)
    return int(spec.n_ctx_train)


def check_yarn(spec: ModelSpec) -> None:
    """YaRN as llama.cpp computes it: attention factor 0.1·ln(factor) + 1, truncated correction range."""
    rope = spec.rope
    if rope.get("factor") is None:
        raise QdoraError("yarn rope scaling without a factor is not supported for export")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if rope.get(key) is not None:
            raise QdoraError(f"yarn with {key}={rope[key]} is not supported for export: llama.cpp derives the "
                             "attention factor from the scaling factor alone")
    if rope.get("truncate") is False:
        raise QdoraError("yarn with truncate=false is not supported for export (llama.cpp truncates)")
