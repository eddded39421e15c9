"""The GPU check's dry run (every phase at tiny shapes on the CPU): it cannot rot while no GPU is lent.

Each phase runs as `python -m benchmarks.gpu --phase NAME --dry-run` in a subprocess, exactly as on the
GPU machine, and must pass every check and write its JSON and its part of RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu.phases import PHASES
from qdora.testing.runs import SUBPROCESS_ENV

ROOT = Path(__file__).resolve().parents[3]


def run_check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_phase_dry_run_passes(phase, tmp_path):
    proc = run_check("--phase", phase, "--out", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rep = json.loads((tmp_path / f"{phase}.json").read_text())
    assert rep["ok"] and rep["dry_run"] and rep["rows"], rep
    assert all(r["ok"] for r in rep["rows"])
    assert (tmp_path / f"{phase}.log").stat().st_size > 0
    assert f"### {phase} (dry run, CPU): ok" in (tmp_path / "RESULTS.md").read_text()
    # at most 8 files come back from the device machine: a phase leaves its log and JSON (+ RESULTS.md)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{phase}.json", f"{phase}.log", "RESULTS.md"])


def test_unknown_phase_is_refused(tmp_path):
    proc = run_check("--phase", "setup,nonsense", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "unknown phase(s) nonsense" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_out_must_be_a_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = run_check("--phase", "setup", "--out", str(f), timeout=120)
    assert proc.returncode == 1 and "is not a folder" in proc.stderr
    assert f.read_text() == "x"
