"""HF tokenizer -> GGUF vocabulary metadata, read from tokenizer.json rather than guessed from a hash.

llama.cpp's own converter names the pre-tokenizer by hashing the token ids of a sample text, so it refuses
any vocabulary it has not seen (a fine-tune that added tokens, a small test tokenizer). The pre-tokenizer
is a property of the split regex, so qdora reads that regex from tokenizer.json and maps it to the name
llama.cpp uses to select the same regex. Byte-level BPE (Llama 3, Qwen2/3, Mistral's Tekken, Phi-4-mini)
becomes `gpt2`; SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B, Gemma, Phi-3) becomes
`llama`, with scores from merge ranks (and no dummy prefix where the tokenizer adds none: Gemma).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from qdora.errors import QdoraError
from qdora.export.pretokenizers import BPE_PRE_TOKENIZERS, LLAMACPP_IGNORES_MERGES

log = logging.getLogger(__name__)

TT = gguf.TokenType

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class VocabInfo:
    """Everything the `tokenizer.*` GGUF keys need, gathered before the file is opened."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None

    def special_text(self, kind: str) -> str | None:
        tid = self.special_ids.get(kind)
        return None if tid is None else self.tokens[tid]


def _steps(component: dict[str, Any] | None, list_key: str) -> list[dict[str, Any]]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        return list(component.get(list_key, []))
    return [component]


def bpe_pre_name(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE, from its Split regex; clear error if unknown."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    kinds = [s.get("type") for s in steps]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    splits_ok = all(
        s.get("behavior") == "Isolated" and not s.get("invert") for s in steps if s.get("type") == "Split"
    )
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if kinds == ["Split", "ByteLevel"] and splits_ok and not byte_level[0].get("use_regex", True):
        name = BPE_PRE_TOKENIZERS.get(regexes[0])
        if name is not None:
            if bool(tokenizer_json["model"].get("ignore_merges", False)) != LLAMACPP_IGNORES_MERGES[name]:
                log.warning("tokenizer.json sets ignore_merges=%s but llama.cpp's %s uses %s: rare words may "
                            "split differently", tokenizer_json["model"].get("ignore_merges", False), name,
                            LLAMACPP_IGNORES_MERGES[name])
            return name
    found = f"split regex {regexes[0]!r}" if regexes else f"pre-tokenizer steps {kinds}"
    raise QdoraError(
        f"unrecognised BPE pre-tokenizer: {found}. qdora exports byte-level BPE with the split regex of "
        "Llama 3 (llama-bpe), Qwen2 (qwen2), Tekken (tekken) or GPT-4o (gpt-4o), followed by "
        "ByteLevel(use_regex=false)"
    )


def _sentencepiece_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a `▁` is prepended to the text (SentencePiece's dummy prefix), in either spelling."""
    for step in _steps(tokenizer_json.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
    for step in _steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _kind(tokenizer_json: dict[str, Any]) -> str:
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise QdoraError(f"tokenizer model {model.get('type')!r} is not supported (only BPE is)")
    if model.get("byte_fallback"):
        return "llama"
    normalizers = [s.get("type") for s in _steps(tokenizer_json.get("normalizer"), "normalizers")]
    if any(n != "NFC" for n in normalizers):
        raise QdoraError(f"byte-level BPE normalizer {normalizers} is not reproduced by llama.cpp")
    return "gpt2"


def _merge_strings(merges: list[Any]) -> list[str]:
    """tokenizer.json merges (old "a b" strings or new [a, b] pairs) -> GGUF's "a b" strings."""
    if merges and isinstance(merges[0], str):
        return list(merges)
    return [" ".join(pair) for pair in merges]


def _merge_scores(merges: list[Any]) -> dict[str, float]:
    """SentencePiece scores from merge ranks: a piece made by an earlier merge wins (score -rank)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _added_flags(tok: Any, probe: str = "Hello") -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, observed on the HF tokenizer itself rather than read from configs."""
    with_special = tok(probe, add_special_tokens=True)["input_ids"]
    without = tok(probe, add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(without)
    add_bos = extra > 0 and tok.bos_token_id is not None and with_special[0] == tok.bos_token_id
    add_eos = extra > 0 and tok.eos_token_id is not None and with_special[-1] == tok.eos_token_id
    if extra != int(add_bos) + int(add_eos):
        log.warning("the tokenizer adds tokens other than BOS/EOS (%s); llama.cpp will not", with_special)
    return add_bos, add_eos


def read_vocab(model_dir: Path, n_rows: int, config_ids: dict[str, int | None]) -> VocabInfo:
    """Gather the GGUF vocabulary of the tokenizer in `model_dir`, padded to `n_rows` embedding rows."""
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    kind = _kind(tokenizer_json)
    pre = bpe_pre_name(tokenizer_json) if kind == "gpt2" else None
    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.is_fast:
        raise QdoraError(f"{model_dir}: the tokenizer did not load as a fast (tokenizer.json) tokenizer")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_rows:
        raise QdoraError(
            f"the tokenizer has token id {max(vocab.values())} but the embedding has only {n_rows} rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    merges = tokenizer_json["model"].get("merges", [])
    scores = _merge_scores(merges) if kind == "llama" else {}
    tokens, types, token_scores = [], [], []
    for i in range(n_rows):
        text = by_id.get(i)
        score = 0.0
        if text is None:
            text, ttype = f"[PAD{i}]", TT.UNUSED
        elif i == tok.unk_token_id:
            ttype = TT.UNKNOWN
        elif i in added:
            ttype = TT.CONTROL if added[i].special else TT.USER_DEFINED
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(text):
            ttype = TT.BYTE
        else:
            ttype = TT.NORMAL
            score = scores.get(text, 0.0)
        tokens.append(text)
        types.append(int(ttype))
        token_scores.append(score)
    special_ids = {
        "bos": tok.bos_token_id if tok.bos_token_id is not None else config_ids.get("bos"),
        "eos": tok.eos_token_id if tok.eos_token_id is not None else config_ids.get("eos"),
        "unk": tok.unk_token_id,
        "pad": tok.pad_token_id if tok.pad_token_id is not None else config_ids.get("pad"),
    }
    add_bos, add_eos = _added_flags(tok)
    template = tok.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    return VocabInfo(
        model=kind,
        tokens=tokens,
        types=types,
        pre=pre,
        scores=token_scores if kind == "llama" else None,
        merges=_merge_strings(merges) if kind == "gpt2" else [],
        special_ids={k: int(v) for k, v in special_ids.items() if v is not None},
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=_sentencepiece_prefix(tokenizer_json) if kind == "llama" else None,
        chat_template=template,
    )


def write_vocab(writer: gguf.GGUFWriter, info: VocabInfo) -> None:
    """The `tokenizer.ggml.*` and `tokenizer.chat_template` keys."""
    writer.add_tokenizer_model(info.model)
    if info.pre is not None:
        writer.add_tokenizer_pre(info.pre)
    writer.add_token_list(info.tokens)
    writer.add_token_types(info.types)
    if info.scores is not None:
        writer.add_token_scores(info.scores)
    if info.merges:
        writer.add_token_merges(info.merges)
    for kind, tid in info.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(info.add_bos)
    writer.add_add_eos_token(info.add_eos)
    if info.add_space_prefix is not None:
        writer.add_add_space_prefix(info.add_space_prefix)
    if info.chat_template:
        writer.add_chat_template(info.chat_template)
