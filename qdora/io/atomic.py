"""Write a file all at once or not at all: the one mechanism every qdora writer uses.

A crash, an error or Ctrl-C halfway through must never leave a truncated adapter, GGUF, CSV or plot
where a finished one is expected, nor a temporary file beside it. So each writer fills a hidden
temporary file in the same folder (same filesystem: the rename is atomic) and renames it over the target
only when the writing function returned.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temp_path(path: Path) -> Path:
    """`.NAME.tmp-PID.SUFFIX` beside `path`: hidden, unique per process, same suffix (some writers
    such as matplotlib choose the format from it)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file, then rename it to `path`; remove it on any failure."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
