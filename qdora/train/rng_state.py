"""The random number generators a run depends on (torch CPU/CUDA, Python, NumPy) as plain JSON.

Checkpoints store them so a resumed run draws the same dropout masks as an uninterrupted one. JSON, not
pickle: reading a checkpoint must never run code (a pickled `random.getstate()` would be the easy way).
Byte states (torch's) are base64; Python's Mersenne Twister state is a list of 625 ints; NumPy's the
same five fields `np.random.get_state()` returns.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

from qdora.errors import QdoraError


def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's generator states, JSON-ready."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _bytes(torch.get_rng_state()),
        "python": {"version": version, "state": list(mt), "gauss_next": gauss},
        "numpy": {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` recorded (CUDA only when this machine has it)."""
    try:
        torch.set_rng_state(_tensor(state["torch"]))
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
        nps = state["numpy"]
        np.random.set_state((str(nps["name"]), np.array(nps["keys"], dtype=np.uint32), int(nps["pos"]),
                             int(nps["has_gauss"]), float(nps["cached_gaussian"])))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise QdoraError(f"the checkpoint's RNG state is damaged: {e}") from e
