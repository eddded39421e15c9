"""Checks before a long write starts: the output folder is writable and has room for what qdora is
about to write. A 70B merge is ~140 GB: better refused in the first second than after an hour.

Sizes come from the caller (merge: the output shapes and dtype; export: the GGUF tensor table). Free
space is what an unprivileged user may use (`f_bavail`), on the filesystem of the nearest existing
folder, since the output folder itself may not exist yet.
"""

from __future__ import annotations

import os
from pathlib import Path

from qdora.io.failures import WriteFailure


def existing_ancestor(path: str | Path) -> Path:
    """`path` or its nearest parent that exists (where the output folder will be created)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged user may still write on the filesystem holding `path`; None if unknown."""
    try:
        st = os.statvfs(existing_ancestor(path))
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def check_writable(path: str | Path, what: str) -> None:
    """Refuse an output whose folder (or the nearest existing parent) is read-only or not writable."""
    folder = existing_ancestor(path)
    if folder.is_file():
        folder = folder.parent
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise WriteFailure(path, what, f"{folder} is on a read-only filesystem")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WriteFailure(path, what, f"permission denied: {folder} is not writable by this user")
    target = Path(path)
    if target.exists() and not os.access(target, os.W_OK):
        raise WriteFailure(path, what, f"permission denied: {target} is not writable by this user")


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse to start writing `needed` bytes under `path` when its filesystem has less free."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise WriteFailure(path, what, "not enough free space", needed, free,
                           "free some space or choose an output on another disk")


def check_output(path: str | Path, needed: int, what: str) -> None:
    """Both checks, in the order a user fixes them."""
    check_writable(path, what)
    check_free_space(path, needed, what)
