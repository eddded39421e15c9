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

# Qwen2's split regex (tokenizer.json of Qwen2/Qwen2.5): like Llama 3's but one digit per piece.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 2 / Mistral v0.1 style: [INST] ... [/INST] answer</s>; a system message joins the next user turn.
LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

SENTENCEPIECE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
TOKENIZER_KINDS = ("llama3", "sentencepiece", "qwen2")

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


def _training_texts(corpus: list[str] | None) -> list[str]:
    return (corpus or demo_corpus()) + [f"{r['instruction']} {r['output']}" for r in demo_records()]


def build_sentencepiece_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None):
    """A Llama-2/Mistral-style tokenizer as tokenizer.json stores it: BPE with byte fallback on `▁` pieces.

    Layout as in Llama 2's tokenizer.json: `<unk>`, `<s>`, `</s>`, then the 256 byte tokens
    `<0x00>`..`<0xFF>`, then the learned pieces. The merges are rebuilt the way transformers converts a
    SentencePiece model (every split of every piece, ranked by the piece's id), so HF's BPE reproduces
    SentencePiece's score-ordered merging, which is what llama.cpp runs for `tokenizer.ggml.model=llama`.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    # 1. learn pieces inside words (SentencePiece's default split_by_whitespace)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    learner.train_from_iterator(_training_texts(corpus), trainer=trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])

    # 2. the final vocabulary in Llama 2's order, and SentencePiece-equivalent merges
    pieces = SENTENCEPIECE_SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in learned if p not in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=sentencepiece_merges(vocab), unk_token="<unk>", byte_fallback=True,
                   fuse_unk=True)
    )
    # Llama 2's tokenizer.json form of SentencePiece's dummy prefix: always prepend `▁`, then spaces -> `▁`.
    # (A Metaspace pre-tokenizer would skip the prefix when the text already starts with a space, where
    # SentencePiece and llama.cpp do not.)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [AddedToken(t, special=True, normalized=False) for t in SENTENCEPIECE_SPECIAL_TOKENS]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = LLAMA2_CHAT_TEMPLATE
    return fast


def sentencepiece_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of every piece whose halves are pieces, ranked by the whole piece's id."""
    merges = []
    for piece, pid in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        merges += [(pid, vocab[a], vocab[b], a, b) for a, b in splits]
    return [(a, b) for *_, a, b in sorted(merges)]


def build_qwen2_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None):
    """A Qwen2-style byte-level BPE: Qwen2's split regex (single digits), NFC, ChatML specials at the end."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_training_texts(corpus), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tokenizer(kind: str = "llama3"):
    """The tiny tokenizer of one kind: `llama3` (byte-level BPE), `sentencepiece` (Llama 2), `qwen2`."""
    if kind == "llama3":
        return build_bpe_tokenizer()
    if kind == "sentencepiece":
        return build_sentencepiece_tokenizer()
    if kind == "qwen2":
        return build_qwen2_tokenizer()
    raise ValueError(f"unknown tiny tokenizer {kind!r}: choose one of {', '.join(TOKENIZER_KINDS)}")


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
