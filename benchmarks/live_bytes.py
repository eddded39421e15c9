"""Peak live tensor bytes on any device, measured at the dispatcher (the CPU stand-in for CUDA's
`max_memory_allocated`).

`LiveBytes` is a TorchDispatchMode: every op's output storages are recorded (deduplicated by data
pointer, so views count once) with a weak reference, and freed storages are dropped before each new
op's outputs are added. The peak is taken over op boundaries. Storages alive before the mode started
(parameters, buffers, optimizer states) are added from `baseline`. What it does not see: scratch memory
a kernel allocates and frees internally, and allocator rounding/caching — so it is a lower bound of
what a caching allocator would report, close to it for large tensors. `mark()` splits a step into
phases (live bytes at the mark, peak since the previous one): benchmarks/layer_memory.py uses it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def storage_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, set[int]]:
    """Total bytes of the distinct storages behind `tensors`, and their data pointers."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total, seen


class LiveBytes(TorchDispatchMode):
    """Track the peak of (baseline + bytes of live storages created under the mode)."""

    def __init__(self, baseline: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.baseline_bytes, self._baseline_ptrs = storage_bytes(baseline)
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._live_bytes = 0
        self.peak_new = 0
        self._segment_peak = 0

    @property
    def current(self) -> int:
        """Baseline + bytes of the storages created under the mode that are still alive."""
        self._purge()
        return self.baseline_bytes + self._live_bytes

    def mark(self) -> tuple[int, int]:
        """(live bytes now, peak since the previous mark): splits a step into phases (forward, backward)."""
        now = self.current
        peak = self.baseline_bytes + max(self._segment_peak, self._live_bytes)
        self._segment_peak = self._live_bytes
        return now, peak

    @property
    def peak(self) -> int:
        return self.baseline_bytes + self.peak_new

    def _purge(self) -> None:
        dead = [ptr for ptr, (ref, _) in self._live.items() if ref.expired()]
        for ptr in dead:
            self._live_bytes -= self._live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._purge()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in self._live or ptr in self._baseline_ptrs or st.nbytes() == 0:
                continue
            self._live[ptr] = (StorageWeakRef(st), st.nbytes())
            self._live_bytes += st.nbytes()
        self.peak_new = max(self.peak_new, self._live_bytes)
        self._segment_peak = max(self._segment_peak, self._live_bytes)
        return out
