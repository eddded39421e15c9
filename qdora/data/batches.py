"""A resumable, deterministic, rank-sharded micro-batch iterator over tokenized rows.

Every epoch shuffles the row order with a generator seeded by (seed, epoch), so the order depends only
on the seed and the epoch, never on how the run was interrupted. A *global batch* is
`micro_batch × world_size` consecutive rows of that order; rank r takes rows [r·micro_batch,
(r+1)·micro_batch) of each global batch. So world_size ranks with micro_batch m see, together, exactly
the rows one process with micro_batch m·world_size sees, step for step. The rows left over after the last
full global batch of an epoch are dropped (they are reshuffled into later epochs), so every rank runs
the same number of steps.

`state_dict()` after receiving k batches of an epoch is {epoch, position: k}; `load_state_dict` makes
the iterator continue with exactly the batches an uninterrupted run would have produced next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from qdora.errors import QdoraError


class Rows(Protocol):
    def __len__(self) -> int: ...
    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]: ...


class BatchIterator:
    """Yields dicts of tensors (`input_ids`, `labels`, and `attention_mask` or `position_ids`)."""

    def __init__(
        self,
        rows: Rows,
        micro_batch: int,
        epochs: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if micro_batch < 1 or epochs < 1 or world_size < 1:
            raise QdoraError(
                f"micro_batch, epochs and world_size must be >= 1 (got {micro_batch}, {epochs}, {world_size})"
            )
        if not 0 <= rank < world_size:
            raise QdoraError(f"rank {rank} is outside world_size {world_size}")
        self.rows, self.micro_batch, self.epochs, self.seed = rows, micro_batch, epochs, seed
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.global_batch = micro_batch * world_size
        if len(rows) < self.global_batch:
            raise QdoraError(
                f"the dataset has {len(rows)} rows, fewer than one global batch "
                f"(micro_batch {micro_batch} × world_size {world_size} = {self.global_batch})"
            )
        self.epoch = 0
        self.position = 0

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def steps_per_epoch(self) -> int:
        """Micro batches per epoch for this rank (the same on every rank)."""
        return len(self.rows) // self.global_batch

    def __len__(self) -> int:
        """Micro batches over all epochs, from the start (not from a resumed position)."""
        return self.steps_per_epoch * self.epochs

    def remaining(self) -> int:
        return len(self) - self.epoch * self.steps_per_epoch - self.position

    def epoch_order(self, epoch: int) -> list[int]:
        """The row order of `epoch`: a permutation seeded by (seed, epoch), or identity without shuffling."""
        if not self.shuffle:
            return list(range(len(self.rows)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.epoch < self.epochs:
            if self.position >= self.steps_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            order = self.epoch_order(self.epoch)
            while self.position < self.steps_per_epoch:
                start = self.position * self.global_batch + self.rank * self.micro_batch
                batch = self.rows.collate(order[start : start + self.micro_batch])
                self.position += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
            "num_rows": len(self.rows),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; refuses one saved with a different seed, batch layout or dataset size."""
        for key in ("seed", "micro_batch", "world_size", "num_rows"):
            if key in state and state[key] != getattr(self, key):
                raise QdoraError(
                    f"cannot resume the data iterator: {key} was {state[key]} when saved, "
                    f"now {getattr(self, key)}"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
