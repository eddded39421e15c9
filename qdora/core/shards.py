"""Whole tensors and FSDP2 shards: the one place that knows a parameter may be a DTensor.

Under FSDP2 every parameter is a `DTensor` holding this rank's dim-0 chunk (as `torch.chunk` splits it);
without it a parameter is a plain tensor. Code that reads or writes *whole* tensors (saving and loading
adapters, initialising them, filling the base from a checkpoint) goes through `whole` and `fill_param`,
so the same code serves one process and many ranks.
"""

from __future__ import annotations

import torch

from qdora.errors import QdoraError


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached (all-gathered under FSDP2: a collective, call it on every rank in the same
    order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor().detach() if isinstance(t, DTensor) else t.detach()


def _local_rows(param: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, source) for filling `param` from the full tensor: this rank's dim-0 chunk under FSDP2."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, full
    local = param.to_local()
    mesh = param.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunks = torch.chunk(full, world, dim=0)  # FSDP2 shards dim 0 as torch.chunk does
    src = chunks[rank] if rank < len(chunks) else full[:0]
    return local, src


@torch.no_grad()
def fill_param(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter (or its FSDP2 shard), keeping the parameter's dtype and device."""
    dst, src = _local_rows(param, full)
    if tuple(dst.shape) != tuple(src.shape):
        raise QdoraError(f"shape mismatch while loading: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src.to(device=dst.device, dtype=dst.dtype))  # NF4 bytes arrive already in the storage dtype
