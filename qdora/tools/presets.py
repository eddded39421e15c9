"""Named model shapes built in code (no hub download): for `qdora plan` shortcuts and the benchmarks.

Figures are those of the published configs (Llama-3.2-1B, Llama-3-8B, Llama-3-70B, Qwen2.5-7B,
Mistral-7B v0.3); `tiny` and `small` are CPU-sized Llama shapes with every linear input a multiple of 64
so NF4 blocks never cross a row.
"""

from __future__ import annotations

from qdora.errors import QdoraError

_SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "mistral-7b": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1000000.0),
}
# Mixture-of-experts shapes of the published configs (Qwen3-30B-A3B, Mixtral-8x7B-v0.1).
_MOE_SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128,
                                        num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False,
                                        max_position_embeddings=40960, rope_theta=1000000.0)),
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
                                     max_position_embeddings=32768, rope_theta=1000000.0)),
}
_FAMILY = {"qwen2.5-7b": "qwen2", "mistral-7b": "mistral"}  # the others are Llama shapes
_ALIASES = {"1b": "llama-3.2-1b", "8b": "llama-3-8b", "70b": "llama-3-70b"}
# "<preset>-<k>layers" keeps a preset's widths with k decoder layers (e.g. 70b-4layers).


def preset_names() -> list[str]:
    return sorted(_SHAPES) + sorted(_MOE_SHAPES) + sorted(_ALIASES) + ["70b-4layers"]


def preset_config(name: str):
    """A transformers config (Llama, Qwen2 or Mistral) for a named shape; `NAME-Klayers` overrides the layer
    count."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base, layers = name, None
    if name.endswith("layers") and "-" in name:
        base, _, tail = name.rpartition("-")
        digits = tail[: -len("layers")]
        if not digits.isdigit() or int(digits) < 1:
            raise QdoraError(f"bad layer count in shape {name!r}: use e.g. 70b-4layers")
        layers = int(digits)
    base = _ALIASES.get(base, base)
    if base in _MOE_SHAPES:
        from transformers import AutoConfig

        model_type, kw = _MOE_SHAPES[base]
        kw = dict(kw, **({"num_hidden_layers": layers} if layers is not None else {}))
        return AutoConfig.for_model(model_type, **kw)
    if base not in _SHAPES:
        raise QdoraError(f"unknown model shape {name!r}: choose one of {', '.join(preset_names())}")
    kw = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=0,
              eos_token_id=1, pad_token_id=None)
    kw.update(_SHAPES[base])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cls = {"qwen2": Qwen2Config, "mistral": MistralConfig}.get(_FAMILY.get(base, ""), LlamaConfig)
    return cls(**kw)
