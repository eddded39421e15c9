"""Token storage and batch assembly: packed fixed-length rows, or padding to the micro batch's longest.

Packing (greedy, in order, no example split across rows): examples are concatenated into rows of exactly
`seq_len` tokens; a row that cannot take the next example is padded (pad id, label -100) and closed.
`position_ids` restart at 0 for every example (and for the padding tail). transformers 5 (masking_utils,
`find_packed_sequence_indices`) turns such restarting position ids into a block-diagonal causal mask for
the sdpa and eager attention implementations (checked on CPU, transformers 5.23), *but only when no
attention_mask is passed and no KV cache exists*. So packed batches carry `position_ids` and no
`attention_mask`, and the model MUST be called with `use_cache=False` (Llama's config defaults to
use_cache=True, which creates a DynamicCache and silently disables the detection: attention then crosses
example boundaries). tests/test_data.py checks isolation against running each example alone.
The first token of every example is labelled -100 so the previous example's last token is never trained
to predict the next example's bos: the packed loss is exactly the sum of the examples' separate losses.

Without packing, rows keep their own length and a micro batch is right-padded to its longest row
(pad id, label -100, attention_mask 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qdora.data.formats import IGNORE_INDEX


class PackedRows:
    """Fixed-length packed rows: `[rows, seq_len]` int arrays of ids, labels and position ids."""

    packed = True

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray):
        self.input_ids, self.labels, self.position_ids = input_ids, labels, position_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def trained_tokens(self) -> int:
        """Tokens that are predicted (have a label) — packing already masked each example's first token."""
        return int((self.labels != IGNORE_INDEX).sum())

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return {
            "input_ids": torch.from_numpy(self.input_ids[idx]),
            "labels": torch.from_numpy(self.labels[idx]),
            "position_ids": torch.from_numpy(self.position_ids[idx]),
        }


class RaggedRows:
    """Variable-length examples stored flat with offsets; collated with right padding."""

    packed = False

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
        lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.ids = np.fromiter((t for ids, _ in examples for t in ids), np.int64, int(self.offsets[-1]))
        self.labels = np.fromiter((t for _, lab in examples for t in lab), np.int64, int(self.offsets[-1]))
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def trained_tokens(self) -> int:
        """Tokens that are predicted: labelled ones, except each example's first (nothing precedes it)."""
        firsts = self.labels[self.offsets[:-1]]
        return int((self.labels != IGNORE_INDEX).sum() - (firsts != IGNORE_INDEX).sum())

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.labels[a:b]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.example(i) for i in indices]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.from_numpy(ids)
            labels[r, : len(ids)] = torch.from_numpy(lab)
            mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def pack_examples(
    examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> PackedRows:
    """Greedily pack examples (each at most `seq_len` tokens) in order into rows of `seq_len` tokens."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def close() -> None:
        tail = seq_len - len(ids)
        rows.append((ids + [pad_id] * tail, labels + [IGNORE_INDEX] * tail, pos + list(range(tail))))

    for ex_ids, ex_labels in examples:
        if len(ex_ids) > seq_len:
            raise ValueError(f"example of {len(ex_ids)} tokens exceeds seq_len {seq_len}: truncate first")
        if len(ids) + len(ex_ids) > seq_len:
            close()
            ids, labels, pos = [], [], []
        ids += ex_ids
        labels += [IGNORE_INDEX] + list(ex_labels[1:])
        pos += range(len(ex_ids))
    if ids:
        close()
    arrays = [np.array([r[k] for r in rows], dtype=np.int64).reshape(len(rows), seq_len) for k in range(3)]
    return PackedRows(*arrays)
