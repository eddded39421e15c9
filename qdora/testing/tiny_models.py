"""Tiny causal LMs of each family written as a Hugging Face folder (safetensors + config + tokenizer).

Random (seeded) weights, a few hundred thousand parameters; every linear input a multiple of 64 so NF4
blocks never cross a row. The demo and every test build their base model here: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qdora.testing.tiny_tokenizers import build_tokenizer

# Per-family shape choices on top of the common ones: head_dim != hidden / heads where the family allows it
# (Qwen3, Gemma), Gemma 3's real 5 local : 1 global layer pattern with a window shorter than the test
# prompts, Phi-3's partial rotary.
FAMILY_DEFAULTS: dict[str, dict] = {
    "qwen3": dict(head_dim=32),
    "gemma2": dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=6, num_hidden_layers=2,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6),
    "gemma3_text": dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=6, num_hidden_layers=6,
                        rms_norm_eps=1e-6),
    "phi3": dict(partial_rotary_factor=0.5),
}
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def tiny_config(family: str = "llama", vocab_size: int = 448, **overrides):
    """A transformers config for a tiny model of one family (see TINY_FAMILIES, and the MoE families of
    `tiny_moe`: qwen3_moe, mixtral, qwen2_moe)."""
    from transformers import AutoConfig

    from qdora.testing.tiny_moe import MOE_FAMILIES, tiny_moe_config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=4,
        pad_token_id=1,
    )
    if family in MOE_FAMILIES:
        return tiny_moe_config(family, {**common, **overrides})
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}: choose one of {', '.join(TINY_FAMILIES + MOE_FAMILIES)}")
    if family == "mistral":
        common["sliding_window"] = None
    common.update(FAMILY_DEFAULTS.get(family, {}))
    common.update(overrides)
    return AutoConfig.for_model(family, **common)


def build_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: str = "llama3",
    **config_overrides,
) -> Path:
    """Write a tiny causal LM (safetensors + config + tokenizer) to `out_dir` and return the path.

    `tokenizer` picks `llama3`, `sentencepiece` or `qwen2` (see `build_tokenizer`); the config's special
    token ids follow it. Config overrides pass through, e.g. `tie_word_embeddings=True`,
    `rope_scaling={"rope_type": "llama3", ...}`, or a larger `initializer_range` for peakier logits.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(tokenizer)
    vocab = (len(tok) // 64 + 1) * 64  # embedding rows padded past the token count, as real models do
    config_overrides.setdefault("vocab_size", vocab)
    if tokenizer != "llama3":  # the llama3 defaults of tiny_config already match build_bpe_tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id  # Qwen2: <|endoftext|>
        config_overrides.setdefault("bos_token_id", bos)
        config_overrides.setdefault("eos_token_id", tok.eos_token_id)
        config_overrides.setdefault("pad_token_id", tok.pad_token_id)
    config = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
