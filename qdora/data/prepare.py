"""Data pipeline entry point: local files → validated records → token ids/labels → rows → batches.

    data = prepare_data("train.jsonl", tokenizer, seq_len=2048, fmt="auto", completion_only=True, pack=True)
    for batch in data.batches(micro_batch=4, epochs=2, seed=0, rank=rank, world_size=world):
        # batch: input_ids, labels, and attention_mask (padded) or position_ids (packed)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = model.model(**inputs, use_cache=False).last_hidden_state  # use_cache=False: see data_pack
        loss_sum, count = chunked_cross_entropy(hidden, model.lm_head.weight, batch["labels"])

Truncation: an example longer than `seq_len` keeps its first `seq_len` tokens, and one warning says how
many were cut (`truncate=False` refuses them instead, naming the first). Examples left without any
trained token (empty text, or a completion-only prompt that fills `seq_len`) are dropped, and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from qdora.data.batches import BatchIterator
from qdora.data.formats import ENCODERS, IGNORE_INDEX, Example, Segment, resolve_format, tokenize
from qdora.data.hub_data import RepoSelect
from qdora.data.pack import PackedRows, RaggedRows, pack_examples
from qdora.data.sources import load_sources
from qdora.errors import QdoraError

log = logging.getLogger("qdora.data.prepare")
_BLOCK = 1024  # records rendered, then tokenized together in one batched call


@dataclass
class DataStats:
    """What preparation did, for the run log."""

    formats: dict[str, str] = field(default_factory=dict)  # source name -> format used
    revisions: dict[str, str | None] = field(default_factory=dict)  # source name -> Hub commit (None: local)
    examples: int = 0  # records tokenized (empty text records excluded)
    truncated: int = 0  # examples cut to seq_len
    dropped: int = 0  # records/examples without any trained token
    rows: int = 0  # rows the iterator draws from (packed rows, or examples)
    tokens: int = 0  # tokens kept, padding excluded
    trained_tokens: int = 0  # tokens that carry a loss


@dataclass
class PreparedData:
    """Tokenized rows ready to batch, plus the statistics of their preparation."""

    rows: PackedRows | RaggedRows
    stats: DataStats
    seq_len: int

    @property
    def packed(self) -> bool:
        return self.rows.packed

    def batches(
        self, micro_batch: int, epochs: int = 1, seed: int = 0, shuffle: bool = True,
        rank: int = 0, world_size: int = 1,
    ) -> BatchIterator:
        return BatchIterator(self.rows, micro_batch, epochs, seed, shuffle, rank, world_size)


def load_examples(
    path: str | Path, tokenizer, fmt: str = "auto", completion_only: bool = False, txt_mode: str = "line",
    select: RepoSelect | None = None,
) -> tuple[list[Example], list[str], DataStats]:
    """Every record of every source file, validated and tokenized (untruncated), in file order.

    Also returns, per example, where it came from ("file, line N") for later error messages.
    """
    stats = DataStats()
    examples: list[Example] = []
    origins: list[str] = []
    for source in load_sources(path, txt_mode, select):
        used = resolve_format(fmt, source.rows.column_names, source.name)
        stats.formats[source.name] = used
        stats.revisions[source.name] = source.revision
        encode = ENCODERS[used]
        block: list[list[Segment]] = []
        for i, record in enumerate(source.rows):
            rendered = encode(record, tokenizer, completion_only, source.where(i))
            if rendered is None:
                stats.dropped += 1
                continue
            block.append(rendered)
            origins.append(source.where(i))
            if len(block) == _BLOCK:
                examples += tokenize(block, tokenizer)
                block = []
        examples += tokenize(block, tokenizer)
    return examples, origins, stats


def _fit(
    examples: list[Example], origins: list[str], seq_len: int, truncate: bool, stats: DataStats
) -> list[Example]:
    kept = []
    for (ids, labels), where in zip(examples, origins, strict=True):
        if len(ids) > seq_len:
            if not truncate:
                raise QdoraError(
                    f"{where}: {len(ids)} tokens, more than seq_len {seq_len} "
                    "(raise seq_len, or allow truncation)"
                )
            stats.truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(t == IGNORE_INDEX for t in labels[1:]):  # label 0 is never predicted (causal shift)
            stats.dropped += 1
            continue
        kept.append((ids, labels))
    return kept


def prepare_data(
    path: str | Path,
    tokenizer,
    seq_len: int,
    fmt: str = "auto",
    completion_only: bool = False,
    pack: bool = False,
    truncate: bool = True,
    txt_mode: str = "line",
    select: RepoSelect | None = None,
) -> PreparedData:
    """Load, validate, tokenize, truncate and (optionally) pack a dataset (local files, or a dataset repository
    by Hub name or folder: `select` picks its split/config/revision). Raises QdoraError."""
    if seq_len < 2:
        raise QdoraError(f"seq_len must be at least 2, got {seq_len}")
    examples, origins, stats = load_examples(path, tokenizer, fmt, completion_only, txt_mode, select)
    stats.examples = len(examples)
    examples = _fit(examples, origins, seq_len, truncate, stats)
    if stats.truncated:
        log.warning(
            "%d of %d examples were longer than seq_len=%d tokens and were truncated to it",
            stats.truncated, stats.examples, seq_len,
        )
    if stats.dropped:
        log.info("%d records had no trained tokens (empty, or prompt filling seq_len) and were skipped",
                 stats.dropped)
    if not examples:
        raise QdoraError(
            f"{path}: no training examples left ({stats.dropped} records without trained tokens skipped)"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = pack_examples(examples, seq_len, pad_id) if pack else RaggedRows(examples, pad_id)
    stats.rows = len(rows)
    stats.tokens = sum(len(ids) for ids, _ in examples)
    stats.trained_tokens = rows.trained_tokens()
    return PreparedData(rows, stats, seq_len)
