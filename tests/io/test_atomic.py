"""All-or-nothing writes: the target is replaced only by a finished file, and no temp file is left."""

from __future__ import annotations

import pytest

from qdora.io.atomic import atomic_write, temp_path


def test_success_replaces_the_target(tmp_path):
    target = tmp_path / "plot.png"
    target.write_text("old")
    seen = []
    atomic_write(target, lambda tmp: (seen.append(tmp), tmp.write_text("new")))
    assert target.read_text() == "new"
    assert seen[0].suffix == ".png" and seen[0].name.startswith(".")  # format-from-suffix writers work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "rows.csv"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]


def test_failure_before_any_file_exists(tmp_path):
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "a.gguf", lambda tmp: (_ for _ in ()).throw(ValueError("bad")))
    assert list(tmp_path.iterdir()) == []
    assert temp_path(tmp_path / "a.gguf").parent == tmp_path
