"""Write errors in the forms real writers raise them become one WriteFailure; other errors pass through."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qdora.io.failures import WriteFailure
from qdora.io.os_errors import write_errno, writing


def test_python_file_write_on_a_full_disk(small_disk):
    disk = small_disk(64 * 1024)
    with pytest.raises(WriteFailure, match="no space left on the device") as e, \
            writing(disk / "x.bin", "the test file", needed=1 << 20), (disk / "x.bin").open("wb") as f:
        f.write(b"\0" * (1 << 20))
    assert "it needs 1.05 MB" in str(e.value) and isinstance(e.value.__cause__, OSError)


def test_safetensors_rust_error_on_a_full_disk(small_disk):
    """safetensors raises SafetensorError("... (os error 28)"), not OSError."""
    disk = small_disk(64 * 1024)
    with pytest.raises(WriteFailure, match="no space left on the device"), writing(disk / "w.safetensors", "w"):
        save_file({"w": torch.zeros(1 << 16)}, str(disk / "w.safetensors"))


def test_numpy_tofile_loses_the_errno_the_disk_tells(small_disk):
    """numpy's tofile says only "N requested and 0 written": a nearly full disk identifies it."""
    disk = small_disk(64 * 1024)
    with pytest.raises(OSError) as e, (disk / "a.bin").open("wb") as f:
        np.zeros(1 << 16).tofile(f)
    assert e.value.errno is None
    assert write_errno(e.value, disk / "a.bin") == errno.ENOSPC


def test_read_only_or_denied(unwritable_dir):
    folder, words = unwritable_dir
    with pytest.raises(WriteFailure, match=words), \
            writing(folder / "x", "the test file"):
        (folder / "x").write_text("x")


def test_other_errors_are_not_disguised(tmp_path):
    with pytest.raises(ValueError), writing(tmp_path / "x", "x"):
        raise ValueError("a bug")
    with pytest.raises(FileNotFoundError), writing(tmp_path / "x", "x"):
        (tmp_path / "missing" / "x").read_text()
