"""Output checks before a long write: free space from a real small filesystem, permissions for real."""

from __future__ import annotations

import pytest

from qdora.io.failures import WriteFailure
from qdora.io.preflight import check_free_space, check_writable, existing_ancestor, free_bytes


def test_free_bytes_of_a_folder_not_created_yet(small_disk):
    disk = small_disk(1 << 20)
    free = free_bytes(disk / "not" / "yet")
    assert free is not None and 0.9 * (1 << 20) <= free <= 1 << 20
    assert existing_ancestor(disk / "not" / "yet") == disk


def test_free_space_refusal_names_path_need_and_free(small_disk):
    disk = small_disk(1 << 20)
    check_free_space(disk / "out", 500_000, "the merged model")  # fits: no error
    with pytest.raises(WriteFailure) as e:
        check_free_space(disk / "out", 5_000_000, "the merged model")
    msg = str(e.value)
    assert f"cannot write the merged model to {disk / 'out'}: not enough free space" in msg
    assert "it needs 5.00 MB" in msg and "free there" in msg
    assert e.value.needed == 5_000_000 and e.value.free <= 1 << 20


def test_unwritable_folder_refused(unwritable_dir):
    folder, words = unwritable_dir
    with pytest.raises(WriteFailure, match=words):
        check_writable(folder / "sub" / "out", "the GGUF file")


def test_writable_folder_passes(tmp_path):
    check_writable(tmp_path / "new" / "out.gguf", "the GGUF file")
