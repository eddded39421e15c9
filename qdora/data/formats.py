"""Record formats (text, alpaca, chat): detection, validation, rendering to segments, tokenization.

Each record is rendered to text segments (trained or masked), then segments of many records are
tokenized together in batched calls (`tokenize`).

Every example ends with the tokenizer's end token (eos for text/alpaca, the chat template's own turn
end for chat) so that packed examples are separated by it and the model learns to stop.

Completion-only masking (labels -100 on the prompt):
- alpaca: the prompt (everything up to and including "### Response:\\n") is masked, the output and the
  appended eos are trained.
- chat: only assistant turns are trained: their content and the template's end-of-turn text. The spans
  are found by rendering the conversation incrementally with the tokenizer's own chat template:
  turn i spans from the end of render(messages[:i], add_generation_prompt=True) to the end of
  render(messages[:i+1]). This works for any template that renders conversations as growing prefixes
  (tested: Llama 3, ChatML as used by Qwen2); a template that does not is refused with a clear error.
  An assistant turn that opens the conversation starts after what the template puts before its
  content (found by rendering it with a placeholder content).
  Each span is tokenized on its own, so the prompt tokens are exactly what inference feeds the model
  after `add_generation_prompt=True`. (transformers' `return_assistant_tokens_mask` needs
  `{% generation %}` markers that Llama 3's and most published templates lack, so it is not relied on.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from qdora.errors import QdoraError

IGNORE_INDEX = -100  # the label of a token that carries no loss (torch's and transformers' convention)
FORMATS = ("text", "alpaca", "chat")
REQUIRED_COLUMNS = {"text": ("text",), "alpaca": ("instruction", "output"), "chat": ("messages",)}

# Stanford Alpaca's prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Example = tuple[list[int], list[int]]  # (input_ids, labels)


def _accepted() -> str:
    return "; ".join(f"{f} (columns: {', '.join(c)})" for f, c in REQUIRED_COLUMNS.items())


def resolve_format(fmt: str, columns: Sequence[str], where: str) -> str:
    """The format to use for a source with these columns: `fmt` checked, or detected when "auto"."""
    cols = set(columns)
    if fmt == "auto":
        found = [f for f, req in REQUIRED_COLUMNS.items() if set(req) <= cols]
        if len(found) == 1:
            return found[0]
        why = "matches several formats" if found else "matches no format"
        raise QdoraError(
            f"{where}: cannot detect the data format: columns {sorted(cols)} {why}. "
            f"Accepted formats: {_accepted()}. Pass the format explicitly or rename the columns."
        )
    if fmt not in REQUIRED_COLUMNS:
        raise QdoraError(f"unknown data format {fmt!r}: choose auto, {', '.join(FORMATS)}")
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in cols]
    if missing:
        raise QdoraError(f"{where}: format {fmt!r} needs column(s) {missing}; found columns {sorted(cols)}")
    return fmt


def _string(record: dict, field: str, where: str, optional: bool = False) -> str:
    value = record.get(field)
    if value is None:
        if optional:
            return ""
        raise QdoraError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise QdoraError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


class Segment(NamedTuple):
    """A piece of an example's text: tokenized on its own, trained or masked as a whole."""

    text: str
    trained: bool
    special: bool = False  # tokenize with the tokenizer's special tokens (bos) around it
    eos: bool = False  # end with the eos token


def encode_text(record: dict, tokenizer, completion_only: bool, where: str) -> list[Segment] | None:
    """A plain document: all tokens trained. Empty documents are skipped (None)."""
    if completion_only:
        raise QdoraError("completion_only needs a prompt/response format (alpaca or chat), not text")
    text = _string(record, "text", where)
    if not text.strip():
        return None
    return [Segment(text, trained=True, special=True, eos=True)]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for one record (the response follows it directly)."""
    if input_text.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def encode_alpaca(record: dict, tokenizer, completion_only: bool, where: str) -> list[Segment]:
    """Prompt (with the tokenizer's usual bos) + output + eos; the prompt is masked if completion_only."""
    prompt = alpaca_prompt(_string(record, "instruction", where), _string(record, "input", where, True))
    output = _string(record, "output", where)
    return [Segment(prompt, not completion_only, special=True), Segment(output, trained=True, eos=True)]


def _messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if messages is None:
        raise QdoraError(f"{where}: missing field 'messages'")
    if not isinstance(messages, list):
        raise QdoraError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise QdoraError(f"{where}: 'messages' is empty")
    clean = []
    for j, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise QdoraError(f"{where}: message {j} must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if m.get(key) is None else type(m[key]).__name__
                raise QdoraError(f"{where}: message {j} field {key!r} must be a string ({got})")
        # Arrow fills keys that only other rows have with None: drop them before templating.
        clean.append({k: v for k, v in m.items() if v is not None})
    return clean


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja errors, template-raised exceptions
        raise QdoraError(f"{where}: the chat template failed on this conversation ({e})") from e


_SENTINEL = "QDORASENTINEL7f3a"


def _opening(tokenizer, message: dict, where: str) -> str:
    """What a template puts before an assistant turn that opens the conversation (bos, header).

    transformers refuses to render an empty conversation with a generation prompt, so render the turn with
    a placeholder content and keep what precedes it.
    """
    text = _render(tokenizer, [{**message, "content": _SENTINEL}], False, where)
    return text[: text.index(_SENTINEL)] if _SENTINEL in text else ""


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + turn end)."""
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where) if i else _opening(tokenizer, m, where)
        upto = _render(tokenizer, messages[: i + 1], False, where)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise QdoraError(
                f"{where}: the tokenizer's chat template does not render conversations as growing "
                "prefixes, so assistant turns cannot be located for completion_only; "
                "train without completion_only or use a template that does"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(record: dict, tokenizer, completion_only: bool, where: str) -> list[Segment]:
    """The conversation rendered with the tokenizer's chat template; only assistant turns trained if asked."""
    if not getattr(tokenizer, "chat_template", None):
        raise QdoraError("chat format needs a tokenizer with a chat template; this tokenizer has none")
    messages = _messages(record, where)
    if not completion_only:
        return [Segment(_render(tokenizer, messages, False, where), trained=True)]
    full, spans = assistant_spans(tokenizer, messages, where)
    segments = []
    cursor = 0
    for start, stop in [*spans, (len(full), len(full))]:
        segments += [Segment(full[cursor:start], False), Segment(full[start:stop], True)]
        cursor = stop
    return [seg for seg in segments if seg.text]


def tokenize(rendered: Sequence[list[Segment]], tokenizer) -> list[Example]:
    """Token ids and labels for rendered examples, tokenizing all their segments in two batched calls.

    A special segment keeps what the tokenizer adds (bos) but not an eos it may append itself; an `eos`
    segment ends with exactly one eos.
    """
    if tokenizer.eos_token_id is None:
        raise QdoraError("the tokenizer has no eos token: examples could not be terminated")
    eos = tokenizer.eos_token_id
    flat = [seg for segments in rendered for seg in segments]
    ids: list[list[int] | None] = [None] * len(flat)
    for special in (True, False):
        which = [i for i, seg in enumerate(flat) if seg.special == special]
        if which:
            encoded = tokenizer([flat[i].text for i in which], add_special_tokens=special)["input_ids"]
            for i, piece in zip(which, encoded, strict=True):
                ids[i] = list(piece)
    examples = []
    k = 0
    for segments in rendered:
        ex_ids: list[int] = []
        ex_labels: list[int] = []
        for seg in segments:
            piece = ids[k]
            k += 1
            if seg.special and piece and piece[-1] == eos and not seg.text.endswith(tokenizer.eos_token):
                piece.pop()
            if seg.eos and (not piece or piece[-1] != eos):
                piece.append(eos)
            ex_ids += piece
            ex_labels += piece if seg.trained else [IGNORE_INDEX] * len(piece)
        examples.append((ex_ids, ex_labels))
    return examples


ENCODERS = {"text": encode_text, "alpaca": encode_alpaca, "chat": encode_chat}
