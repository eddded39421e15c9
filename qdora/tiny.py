"""Tiny Llama-family models and tokenizers built locally, for the demo and the tests.

There is no model hub on our machines (and users should be able to try qdora offline), so the demo
and every test build their base model here: a byte-level BPE tokenizer trained on a small templated
corpus, and a transformers model of a few hundred thousand parameters with random (seeded) weights.
Every linear layer's input size is a multiple of 64 so the NF4 blocks never cross a row.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

# Llama 3's split regex (tokenizer.json of Meta-Llama-3): GGUF export recognises it as `llama-bpe`.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
_ANIMALS = ["cat", "dog", "fox", "owl", "horse", "mouse", "eagle", "whale"]
_PLACES = ["forest", "river", "city", "garden", "desert", "mountain", "harbour", "valley"]
_VERBS = ["sees", "follows", "finds", "greets", "watches", "helps"]


def demo_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic templated sentences: enough structure for a tiny model to learn quickly."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.sample(_ANIMALS, 2)
        lines.append(
            f"The {rng.choice(_COLOURS)} {a} {rng.choice(_VERBS)} the {b} near the "
            f"{rng.choice(_PLACES)}. It counts {rng.randint(1, 999)} stars."
        )
    return lines


def demo_records(n: int = 200, seed: int = 1) -> list[dict[str, str]]:
    """Alpaca-style records of a simple, learnable mapping: the colour of a named animal."""
    rng = random.Random(seed)
    colour_of = {a: _COLOURS[i % len(_COLOURS)] for i, a in enumerate(_ANIMALS)}
    records = []
    for _ in range(n):
        animal = rng.choice(_ANIMALS)
        records.append(
            {
                "instruction": f"What colour is the {animal}?",
                "input": "",
                "output": f"The {animal} is {colour_of[animal]}.",
            }
        )
    return records


def build_bpe_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None):
    """A Llama-3-style byte-level BPE tokenizer (same split regex and special tokens), trained locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (corpus or demo_corpus()) + [
        f"{r['instruction']} {r['output']}" for r in demo_records()
    ]
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama", vocab_size: int = 448, **overrides):
    """A transformers config for a tiny model of the given family (llama, mistral, qwen2)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

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
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny family {family!r}: choose llama, mistral or qwen2")


def build_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Write a tiny causal LM (safetensors + config + tokenizer) to `out_dir` and return the path."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_bpe_tokenizer()
    vocab = (len(tokenizer) // 64 + 1) * 64  # embedding rows padded past the token count, as real models do
    config_overrides.setdefault("vocab_size", vocab)
    config = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
