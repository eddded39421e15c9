"""The error a failed write becomes: which path, what qdora was writing, why, and the space involved.

A full disk or a read-only folder is the user's environment, not a bug: the CLI prints this one message
and exits 1, without a traceback. Subclassing QdoraError is what makes the CLI treat it that way.
"""

from __future__ import annotations

from pathlib import Path

from qdora.errors import QdoraError


def human_bytes(n: int) -> str:
    """1234567890 -> '1.23 GB' (decimal units, as `df -H` and our size options use)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


class WriteFailure(QdoraError):
    """Writing `what` to `path` failed (or would fail) for `reason`; `needed`/`free` in bytes when known."""

    def __init__(self, path: str | Path, what: str, reason: str, needed: int | None = None,
                 free: int | None = None, hint: str = ""):
        self.path, self.what, self.reason, self.needed, self.free = Path(path), what, reason, needed, free
        self.hint = hint
        message = f"cannot write {what} to {path}: {reason}"
        if needed is not None and free is not None:
            message += f" (it needs {human_bytes(needed)}, {human_bytes(free)} free there)"
        elif free is not None:
            message += f" ({human_bytes(free)} free there now)"
        if hint:
            message += f"; {hint}"
        super().__init__(message)

    def with_hint(self, hint: str) -> WriteFailure:
        """The same failure with `hint` (e.g. the checkpoint to resume from) when it has none yet."""
        if self.hint:
            return self
        return WriteFailure(self.path, self.what, self.reason, self.needed, self.free, hint)
