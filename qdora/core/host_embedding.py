"""The input embedding kept in host memory: a row lookup on the CPU; only the rows used travel.

At 70B the embedding is 128256 × 8192 bf16 = 2 GiB, and FSDP2 keeps the root group (where it lives)
gathered on every GPU for the whole step. It is frozen, and a lookup needs only the rows of the batch's
tokens (seq × hidden: 32 MiB at seq 2048), so it stays on the host: the ids go to the CPU, the rows are
gathered there into pinned memory and copied to the compute device without blocking the host.

The table is a plain tensor attribute, not a parameter or buffer, so `.to()`, `to_empty` and FSDP2 leave
it where it is (on the host) and it is never sharded or gathered. It is frozen: no gradient flows to it.
The lookup is exact: the same values as `nn.Embedding` on the device.
"""

from __future__ import annotations

import torch
from torch import nn


class HostEmbedding(nn.Module):
    """A frozen `nn.Embedding` whose table lives on the host; outputs land on `device`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device: torch.device | str,
                 dtype: torch.dtype = torch.bfloat16, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.device = torch.device(device)
        self.weight = torch.empty(num_embeddings, embedding_dim, dtype=dtype, device="meta")

    @classmethod
    def replacing(cls, embedding: nn.Embedding, device: torch.device | str, dtype: torch.dtype) -> HostEmbedding:
        """An empty host embedding of `embedding`'s shape (fill it with `set_table`)."""
        return cls(embedding.num_embeddings, embedding.embedding_dim, device, dtype, embedding.padding_idx)

    @torch.no_grad()
    def set_table(self, table: torch.Tensor) -> None:
        """Take the full [vocab, hidden] table (any device/dtype) into host memory, pinned when the
        outputs go to CUDA (so the row copies are asynchronous)."""
        if tuple(table.shape) != (self.num_embeddings, self.embedding_dim):
            from qdora.errors import QdoraError

            raise QdoraError(f"embedding of shape {tuple(table.shape)} does not fit "
                             f"{(self.num_embeddings, self.embedding_dim)}")
        host = table.detach().to(device="cpu", dtype=self.weight.dtype).contiguous()
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.weight = host

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")  # a no-op when the caller keeps the ids on the host
        rows = self.weight.index_select(0, ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on the host -> {self.device}"


def embeddings_to_host(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> HostEmbedding:
    """Replace the model's input embedding with an empty `HostEmbedding` (on a meta or real model)."""
    from qdora.errors import QdoraError

    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise QdoraError(f"{type(model).__name__}'s input embedding is {type(emb).__name__}, not nn.Embedding: "
                         "use --embeddings device")
    host = HostEmbedding.replacing(emb, device, dtype)
    if emb.weight.device.type != "meta":
        host.set_table(emb.weight)
    model.set_input_embeddings(host)
    return host
