"""Recognise the write errors a user can fix (full disk, quota, permissions, read-only filesystem) in
whatever form the library that was writing reports them, and turn them into one `WriteFailure`.

Python raises `OSError` with an errno; safetensors' Rust writer raises `SafetensorError("... (os error
28)")`; torch.save and numpy's `tofile` lose the errno altogether ("unexpected pos", "N requested and M
written"). For those the filesystem itself is asked: a write that failed while the disk has no room
left was a full disk.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qdora.io.failures import WriteFailure
from qdora.io.preflight import free_bytes

REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this filesystem or process allows",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only filesystem",
}
_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# A filesystem with less than this left after a failed write was full (no errno to say so).
NEARLY_FULL = 1 << 20
_OS_ERROR = re.compile(r"os error (\d+)")


def write_errno(exc: BaseException, path: str | Path) -> int | None:
    """The errno of a user-fixable write failure, or None if `exc` is something else (a bug)."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:
        m = _OS_ERROR.search(str(exc))
        code = int(m.group(1)) if m else None
    if code in REASONS:
        return code
    if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
        free = free_bytes(path)
        if free is not None and free < NEARLY_FULL:
            return errno.ENOSPC
    return None


def as_write_failure(exc: BaseException, path: str | Path, what: str, needed: int | None = None,
                     hint: str = "") -> WriteFailure | None:
    """`exc` as a WriteFailure naming `path` and `what`, or None when it is not a write failure."""
    code = write_errno(exc, path)
    if code is None:
        return None
    free = free_bytes(path) if code in _SPACE else None
    return WriteFailure(path, what, REASONS[code], needed if code in _SPACE else None, free, hint)


@contextmanager
def writing(path: str | Path, what: str, needed: int | None = None, hint: str = "") -> Iterator[None]:
    """Run a write; a full disk or permission error inside becomes one WriteFailure about `path`."""
    try:
        yield
    except WriteFailure:
        raise
    except Exception as e:
        failure = as_write_failure(e, path, what, needed, hint)
        if failure is None:
            raise
        raise failure from e
