"""Tiny tokenizers of each family's kind, trained locally on the demo data (no hub): byte-level BPE with
Llama 3's or Qwen2's split regex and special tokens, and Llama 2 / Mistral SentencePiece-style BPE."""

from __future__ import annotations

from qdora.export.pretokenizers import GPT4O_REGEX, LLAMA3_REGEX, QWEN2_REGEX, TEKKEN_REGEX
from qdora.testing.demo_data import demo_corpus, demo_records

LLAMA3_JINJA_TEMPLATE = (
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

QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 2 / Mistral v0.1 style: [INST] ... [/INST] answer</s>; a system message joins the next user turn.
LLAMA2_JINJA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

SENTENCEPIECE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# Gemma 2 / 3: <start_of_turn>role ... <end_of_turn>, the assistant is "model"; Gemma 3 puts a system
# message in front of the first user turn (Gemma 2 has no system role).
GEMMA_JINJA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# Phi-3 / Phi-3.5: <|role|>\ncontent<|end|>\n per message, the prompt ends with <|assistant|>\n.
PHI3_JINJA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]

# style -> (leading tokens, added special tokens, bos, eos, unk, pad, chat template, dummy prefix)
_SPM_STYLES = {
    "llama2": (SENTENCEPIECE_SPECIAL_TOKENS, [], "<s>", "</s>", "<unk>", None, LLAMA2_JINJA_TEMPLATE, True),
    "gemma": (GEMMA_SPECIAL_TOKENS, [], "<bos>", "<eos>", "<unk>", "<pad>", GEMMA_JINJA_TEMPLATE, False),
    "phi3": (SENTENCEPIECE_SPECIAL_TOKENS, PHI3_SPECIAL_TOKENS, "<s>", "<|endoftext|>", "<unk>", "<|endoftext|>",
             PHI3_JINJA_TEMPLATE, True),
}
# Mistral Small 3 (V7-Tekken): [SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]user[/INST]answer</s>, no spaces.
TEKKEN_JINJA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST]' + message['content'] + '[/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
TEKKEN_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
# Phi-4-mini: Phi-3's markers without the newlines, o200k byte-level BPE, no BOS.
PHI4_JINJA_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
TOKENIZER_KINDS = ("llama3", "sentencepiece", "qwen2", "gemma", "phi3", "tekken", "phi4")

def _training_texts(corpus: list[str] | None) -> list[str]:
    return (corpus or demo_corpus()) + [f"{r['instruction']} {r['output']}" for r in demo_records()]



def build_bpe_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None):
    """A Llama-3-style byte-level BPE tokenizer (same split regex and special tokens), trained locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
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
    fast.chat_template = LLAMA3_JINJA_TEMPLATE
    return fast


def build_sentencepiece_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None, style: str = "llama2"):
    """A SentencePiece-style tokenizer as tokenizer.json stores it: BPE with byte fallback on `▁` pieces.

    `style` llama2 (Llama 2 / Mistral): `<unk>`, `<s>`, `</s>`, then the 256 byte tokens `<0x00>`..`<0xFF>`,
    then the learned pieces, and SentencePiece's dummy prefix (a `▁` before the text). `gemma`: Gemma's
    `<pad>`, `<eos>`, `<bos>`, `<unk>` and turn markers, no dummy prefix. `phi3`: Llama 2's layout plus
    Phi-3's chat markers as added special tokens. The merges are rebuilt the way transformers converts a
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

    head, added, bos, eos, unk, pad, template, prefix = _SPM_STYLES[style]
    # 1. learn pieces inside words (SentencePiece's default split_by_whitespace)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    learner.train_from_iterator(_training_texts(corpus), trainer=trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])

    # 2. the final vocabulary in the family's order, and SentencePiece-equivalent merges
    pieces = head + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in learned if p not in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=sentencepiece_merges(vocab), unk_token=unk, byte_fallback=True,
                   fuse_unk=True)
    )
    # Llama 2's tokenizer.json form of SentencePiece's dummy prefix: always prepend `▁`, then spaces -> `▁`.
    # (A Metaspace pre-tokenizer would skip the prefix when the text already starts with a space, where
    # SentencePiece and llama.cpp do not.) Gemma has no dummy prefix: spaces -> `▁` only.
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in head])
    if added:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=pad)
    fast.chat_template = template
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
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
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
    fast.chat_template = CHATML_JINJA_TEMPLATE
    return fast


def build_tekken_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None):
    """A Mistral Nemo / Small 3-style Tekken tokenizer: byte-level BPE with the Tekken split regex, control
    tokens first (as in Tekken's tokenizer.json), merges ignored for whole pieces, BOS added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TEKKEN_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TEKKEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_texts(corpus), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = TEKKEN_JINJA_TEMPLATE
    return fast


def build_phi4_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None, ignore_merges: bool = False):
    """A Phi-4-mini-style tokenizer: byte-level BPE with GPT-4o's (o200k) split regex, Phi-3's chat markers
    added at the end of the vocabulary, no BOS."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4O_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_training_texts(corpus), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = PHI4_JINJA_TEMPLATE
    return fast


def build_tokenizer(kind: str = "llama3"):
    """The tiny tokenizer of one kind: `llama3` (byte-level BPE), `sentencepiece` (Llama 2), `qwen2`."""
    if kind == "llama3":
        return build_bpe_tokenizer()
    if kind == "sentencepiece":
        return build_sentencepiece_tokenizer()
    if kind == "qwen2":
        return build_qwen2_tokenizer()
    if kind in ("gemma", "phi3"):
        return build_sentencepiece_tokenizer(style=kind)
    if kind == "tekken":
        return build_tekken_tokenizer()
    if kind == "phi4":
        return build_phi4_tokenizer()
    raise ValueError(f"unknown tiny tokenizer {kind!r}: choose one of {', '.join(TOKENIZER_KINDS)}")
