"""Byte-level BPE split regexes, as tokenizer.json stores them, and the llama.cpp pre-tokenizer each one is.

One definition for both sides: the GGUF exporter maps a tokenizer's regex to llama.cpp's
`tokenizer.ggml.pre` name, and the tiny test tokenizers are built with the same regexes, so a test
tokenizer exports exactly as the real family's would. No dependencies: importable without gguf.
"""

from __future__ import annotations

LLAMA3_REGEX = (  # Meta-Llama-3 / 3.1 / 3.2 / 3.3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (  # Qwen2 / Qwen2.5: one digit per piece
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEKKEN_REGEX = (  # Mistral Nemo / Small 3 / Ministral (Tekken, tiktoken-based): cased words, one digit per piece
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
GPT4O_REGEX = (  # Phi-4-mini (o200k, GPT-4o's split): Tekken's cased words with contractions, up to 3 digits
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# regex -> llama.cpp's name for the pre-tokenizer that splits with it
BPE_PRE_TOKENIZERS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", TEKKEN_REGEX: "tekken", GPT4O_REGEX: "gpt-4o"}
# llama.cpp ties BPE's `ignore_merges` (a pre-token found whole in the vocabulary stays whole) to the name.
LLAMACPP_IGNORES_MERGES = {"llama-bpe": True, "qwen2": False, "tekken": True, "gpt-4o": False}
