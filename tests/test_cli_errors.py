"""How commands end on errors: full disks and unwritable outputs give one message and exit 1 with nothing
left behind, for merge, export and analyze (train: tests/train/test_checkpoint_failures.py); a bug gives
its traceback and a line saying what qdora was doing. Disks are real small tmpfs mounts (conftest)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.export.merge import merge_adapter
from qdora.testing.adapters import make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory):
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("a") / "dora", "dora")


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    return merge_adapter(adapter, tmp_path_factory.mktemp("m") / "merged").output


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error(result, *words: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def files(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --- merge ---------------------------------------------------------------------------------------------


def test_merge_refused_before_writing_when_the_disk_is_too_small(adapter, small_disk):
    disk = small_disk(64 * 1024)
    line = assert_one_error(run("merge", "--adapter", adapter, "--output", disk / "out"),
                            f"cannot write the merged model to {disk / 'out'}: not enough free space",
                            "it needs", "free there")
    assert "kB" in line
    assert files(disk) == []


def test_merge_disk_full_midway_keeps_the_old_output(adapter, small_disk, monkeypatch):
    """The disk fills while writing (another writer took the space the check saw): one message, the
    temporary folder removed, the previous output (being replaced with --overwrite) untouched."""
    import qdora.export.merge as merge_mod

    disk = small_disk(200 * 1024)
    old = disk / "out"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"previous merge")
    monkeypatch.setattr(merge_mod, "check_output", lambda *a: None)
    assert_one_error(run("merge", "--adapter", adapter, "--output", old, "--overwrite", "--shard-size", "100kB"),
                     f"cannot write the merged model to {old}: no space left on the device")
    assert files(disk) == ["out", "out/model.safetensors"]
    assert (old / "model.safetensors").read_bytes() == b"previous merge"


def test_merge_into_an_unwritable_folder(adapter, unwritable_dir):
    folder, words = unwritable_dir
    assert_one_error(run("merge", "--adapter", adapter, "--output", folder / "out"),
                     f"cannot write the merged model to {folder / 'out'}", words)


# --- export --------------------------------------------------------------------------------------------


def test_export_refused_before_writing_when_the_disk_is_too_small(merged, small_disk):
    disk = small_disk(64 * 1024)
    assert_one_error(run("export", "--model", merged, "--output", disk / "m.gguf"),
                     f"cannot write the GGUF file to {disk / 'm.gguf'}: not enough free space", "it needs")
    assert files(disk) == []


def test_export_disk_full_midway_leaves_no_partial_gguf(merged, small_disk, monkeypatch):
    import qdora.export.gguf_export as export_mod

    disk = small_disk(128 * 1024)
    monkeypatch.setattr(export_mod, "check_output", lambda *a: None)
    assert_one_error(run("export", "--model", merged, "--output", disk / "m.gguf", "--outtype", "f32"),
                     f"cannot write the GGUF file to {disk / 'm.gguf'}: no space left on the device")
    assert files(disk) == []


def test_export_into_an_unwritable_folder(merged, unwritable_dir):
    folder, words = unwritable_dir
    assert_one_error(run("export", "--model", merged, "--output", folder / "m.gguf"),
                     f"cannot write the GGUF file to {folder / 'm.gguf'}", words)


# --- analyze -------------------------------------------------------------------------------------------


def test_analyze_into_an_unwritable_folder(adapter, unwritable_dir):
    folder, words = unwritable_dir
    assert_one_error(run("analyze", "--adapter", adapter, "--output", folder / "an"),
                     f"cannot write the analysis (CSV and plot) to {folder / 'an'}", words)


def test_analyze_disk_full(adapter, small_disk):
    disk = small_disk(8 * 1024)
    assert_one_error(run("analyze", "--adapter", adapter, "--output", disk / "an"),
                     f"cannot write the analysis (CSV and plot) to {disk / 'an'}: no space left on the device")
    # the CSV may be complete (written atomically before the plot); nothing partial or temporary is left
    assert set(files(disk)) <= {"an", "an/decomposition.csv"}


# --- bugs ----------------------------------------------------------------------------------------------


def test_an_unexpected_error_shows_its_traceback_and_what_qdora_was_doing(adapter, tmp_path, monkeypatch):
    import qdora.export.merge as merge_mod

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(merge_mod, "merge_weight", broken, raising=False)
    monkeypatch.setattr("qdora.export.adapter_merge.merge_weight", broken)
    result = run("merge", "--adapter", adapter, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ZeroDivisionError: a bug" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("qdora merge: unexpected error while merging model.layers.0."), last
    assert "this is a bug in qdora" in last
    assert files(tmp_path) == []


def test_an_os_error_outside_a_labelled_write_still_gets_one_line(tmp_path, monkeypatch):
    import errno

    import qdora.tools.plan as plan_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(plan_mod, "load_config", full)
    assert_one_error(run("plan", "--model", "llama-3-8b"), f"cannot write {tmp_path / 'x'}: no space left")
