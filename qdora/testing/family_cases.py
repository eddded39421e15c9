"""Tiny models of each exported family, shared by the export tests (built locally, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qdora.testing.tiny_models import build_tiny_model

# Llama 3.1-style rope scaling shrunk to the tiny model: with head_dim 16 and theta 1e4 the 8 wavelengths
# (6.3 .. 3.2e4) fall in all three bands (kept, interpolated, slowed by 8) of a 64-token original context.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# std 0.2 instead of 0.02: peaked logits, so greedy decoding is decided by clear margins, not noise.
CASES: dict[str, dict] = {
    "llama": dict(family="llama", tokenizer="llama3"),
    "llama_tied_rope": dict(family="llama", tokenizer="llama3", tie_word_embeddings=True,
                            rope_scaling=LLAMA3_ROPE),
    "mistral_spm": dict(family="mistral", tokenizer="sentencepiece"),
    "qwen2": dict(family="qwen2", tokenizer="qwen2", tie_word_embeddings=True),
    "qwen3": dict(family="qwen3", tokenizer="qwen2", tie_word_embeddings=True),
    "qwen3_untied": dict(family="qwen3", tokenizer="qwen2"),
    "gemma2": dict(family="gemma2", tokenizer="gemma", tie_word_embeddings=True),
    "gemma3": dict(family="gemma3_text", tokenizer="gemma", tie_word_embeddings=True),
    "phi3": dict(family="phi3", tokenizer="phi3"),
    # Qwen2.5/3 long-context YaRN, shrunk: factor 4 over a 64-token original context; with head_dim 32 and
    # theta 1e4 the correction range falls inside the 16 frequencies, so all three bands are used.
    "qwen3_yarn": dict(family="qwen3", tokenizer="qwen2", tie_word_embeddings=True,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 64}),
    "qwen2_yarn": dict(family="qwen2", tokenizer="qwen2", tie_word_embeddings=True,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 64}),
    # Phi-4-mini shape: 3/4 of each head rotated, tied embeddings, o200k tokenizer.
    "phi4_mini": dict(family="phi3", tokenizer="phi4", partial_rotary_factor=0.75, tie_word_embeddings=True),
    # Mistral Nemo / Small 3 shape: head_dim 32 != hidden / heads, Tekken tokenizer.
    "mistral_tekken": dict(family="mistral", tokenizer="tekken", head_dim=32),
    # Phi-3.5 / Phi-4-mini style longrope: 4 factors per list (rotary dims 8 / 2). The original context
    # (128) is llama.cpp's n_ctx in the tests, so both sides use the short factors (see gguf_phi3.py).
    "phi3_longrope": dict(family="phi3", tokenizer="phi3", max_position_embeddings=1024,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5,
                                           "short_factor": [1.0, 1.3, 2.1, 3.4],
                                           "long_factor": [1.1, 2.5, 4.0, 8.0],
                                           "original_max_position_embeddings": 128}),
}
# Families added with the family registry: norms and biases randomised too (HF's 1 and 0 hide mistakes).
RANDOM_NORMS = {"qwen3", "qwen3_untied", "gemma2", "gemma3", "phi3", "phi3_longrope", "qwen3_yarn",
                "qwen2_yarn", "mistral_tekken", "phi4_mini"}


def build_case(name: str, root: Path, **overrides) -> Path:
    """Build one case under `root/name`; Qwen2 gets random q/k/v biases (HF initialises them to zero)."""
    kwargs = {**CASES[name], "initializer_range": 0.2, **overrides}
    out = build_tiny_model(root / name, seed=1, **kwargs)
    if name in RANDOM_NORMS:
        randomize_norms_and_biases(out)
    elif kwargs["family"] == "qwen2":
        randomize_biases(out)
    return out


def randomize_biases(model_dir: Path, std: float = 0.5) -> None:
    """Give every bias random values so that a mishandled bias shows up in the logits."""
    _randomize(model_dir, (".bias",), std, 0.0)


def randomize_norms_and_biases(model_dir: Path, std: float = 0.5) -> None:
    """Random biases and norm weights: HF initialises norms to 1 (Gemma: 0, stored as w - 1) and biases to 0,
    which hides a norm written without its offset, a norm applied to the wrong tensor, or a lost bias."""
    _randomize(model_dir, (".bias",), std, 0.0)
    _randomize(model_dir, ("norm.weight",), 0.3, None)


def _randomize(model_dir: Path, suffixes: tuple[str, ...], std: float, base: float | None) -> None:
    """Replace tensors named `*suffix` by `base + N(0, std)` (`base` None: add the noise to the values)."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if name.endswith(suffixes):
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * std
            tensors[name] = (noise + (t.float() if base is None else base)).to(t.dtype)
    save_file(tensors, path, metadata={"format": "pt"})
