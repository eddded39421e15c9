"""`--offload activations`: saved hidden states go to pinned host memory on a side stream, and come
back one step ahead of the backward that needs them.

With per-layer gradient checkpointing the tensors autograd saves outside the recomputed regions are the
hidden states at layer boundaries (one [tokens, hidden] tensor per layer: 2.5 GiB at 70B, seq 2048) plus
the final norm's and the loss's inputs. `torch.autograd.graph.save_on_cpu` moves them synchronously and
moves parameters too (the lm_head weight the loss saves: 2 GiB at 70B, each way, each step). Here:

- parameters (anything `nn.Parameter`, including FSDP2's unsharded ones, and views of them such as
  the transposed weight a linear saves) and tensors under `min_bytes`
  stay where they are; so does everything not on CUDA (on a CPU run the hooks change nothing);
- a packed tensor is copied device→host on a side stream after the compute stream's pending work, so
  the forward keeps running; its device memory is released once that copy is done (`record_stream`);
- unpacking tensor k starts the host→device copy of tensor k−1 (the next one a backward in reverse
  order asks for) on the side stream, so it arrives while layer k's backward computes.

`copy_on_cpu=True` runs the same bookkeeping on CPU tensors (copies instead of transfers, no streams):
the tests use it to check that gradients are bit-identical to the plain path. The values round-trip
exactly (a copy), so the offloaded path is exact.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per GPU for the whole process (a context is entered every micro step)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
    return _STREAMS[index]


class _Packed:
    """One offloaded tensor: its host copy, the event of the copy, and a prefetched device copy."""

    __slots__ = ("index", "host", "event", "prefetched", "__weakref__")

    def __init__(self, index: int, host: torch.Tensor, event):
        self.index, self.host, self.event, self.prefetched = index, host, event, None


class HiddenStateOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that park large non-parameter activations in (pinned) host memory."""

    def __init__(self, device: torch.device, min_bytes: int = 1 << 20, copy_on_cpu: bool = False):
        self.device = torch.device(device)
        self.min_bytes = min_bytes
        self.active = self.device.type == "cuda" or copy_on_cpu
        self.stream = _side_stream(self.device) if self.device.type == "cuda" else None
        self._items: weakref.WeakValueDictionary[int, _Packed] = weakref.WeakValueDictionary()
        self._count = 0
        self.offloaded_bytes = 0  # total moved to the host by this context (for tests and benchmarks)
        super().__init__(self._pack, self._unpack)

    def _wanted(self, t: torch.Tensor) -> bool:
        if not self.active or t.device != self._where(t):
            return False
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):  # a weight or its transpose
            return False
        return t.numel() * t.element_size() >= self.min_bytes

    def _where(self, t: torch.Tensor) -> torch.device:
        """The device whose tensors are offloaded (a CUDA index may be implicit in `self.device`)."""
        if self.device.type == "cuda" and t.device.type == "cuda" and self.device.index is None:
            return t.device
        return self.device

    def _pack(self, t: torch.Tensor):
        if not self._wanted(t):
            return t
        if self.stream is None:  # copy_on_cpu: the same bookkeeping, synchronously
            packed = _Packed(self._count, t.detach().clone(), None)
        else:
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            t.record_stream(self.stream)  # the block is not reused before the copy has read it
            packed = _Packed(self._count, host, event)
        self._items[self._count] = packed
        self._count += 1
        self.offloaded_bytes += t.numel() * t.element_size()
        return packed

    def _to_device(self, packed: _Packed, device: torch.device) -> torch.Tensor:
        if self.stream is None:
            return packed.host.clone()
        return packed.host.to(device, non_blocking=True)

    def _unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        device = self.device if self.device.index is not None or self.stream is None else torch.device(
            "cuda", torch.cuda.current_device())
        if packed.prefetched is not None:
            t, event = packed.prefetched
            packed.prefetched = None
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                t.record_stream(torch.cuda.current_stream(device))
        else:
            if packed.event is not None:
                torch.cuda.current_stream(device).wait_event(packed.event)
            t = self._to_device(packed, device)
        self._prefetch(packed.index - 1, device)
        return t

    def _prefetch(self, index: int, device: torch.device) -> None:
        nxt = self._items.get(index)
        if nxt is None or nxt.prefetched is not None:
            return
        if self.stream is None:
            nxt.prefetched = (self._to_device(nxt, device), None)
            return
        with torch.cuda.stream(self.stream):  # after its own device→host copy (same stream)
            t = self._to_device(nxt, device)
            event = torch.cuda.Event()
            event.record(self.stream)
        nxt.prefetched = (t, event)
