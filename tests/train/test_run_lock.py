"""One run per output folder: a second run (a real second process) is refused naming the first's pid and host;
the lock dies with its process, and a stale one is reported and taken over."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdora.errors import QdoraError
from qdora.testing.runs import SUBPROCESS_ENV, alpaca_data, metrics
from qdora.train.run_lock import LOCK_NAME, RunLock, check_free

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
HOLD = ("import sys, time\nfrom qdora.train.run_lock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\ntime.sleep(300)\n")


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding OUTPUT's run lock (as a running `qdora train` does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.communicate()
    return proc


def test_a_lock_held_by_another_process_refuses_naming_it_and_dies_with_it(tmp_path, caplog):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        expected = f"in use by another qdora train run \\(pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(QdoraError, match=expected):
            check_free(out)
        with pytest.raises(QdoraError, match=expected):
            RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # SIGKILL: no cleanup ran, the file stays, the kernel dropped the lock
    check_free(out)
    with caplog.at_level(logging.WARNING, logger="qdora.train.run_lock"):
        lock = RunLock(out).acquire()
    assert lock.stale["pid"] == holder.pid and f"pid {holder.pid}" in caplog.text and "stale" in caplog.text
    lock.release()
    assert not (out / LOCK_NAME).exists() and out.is_dir()  # the folder existed before this lock: kept


def test_a_clean_release_leaves_nothing_and_other_ranks_take_no_lock(tmp_path):
    out = tmp_path / "new"
    with RunLock(out):
        assert (out / LOCK_NAME).is_file()
    assert not out.exists()  # created by the lock and left empty (a run refused during setup): removed
    with RunLock(out, enabled=False):
        assert not out.exists()
    with RunLock(out) as lock:
        assert lock.stale is None


@pytest.mark.slow
def test_a_second_qdora_train_on_the_same_output_is_refused(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qdora.cli", "train", "--model", str(tiny_llama_dir), "--data", str(data),
           "--output", str(out), "--max-steps", "10000", "--micro-batch", "2", "--seq-len", "128", "--rank", "4",
           "--dtype", "fp32", "--device", "cpu", "--scheduler", "constant", "--lr", "1e-3"]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and metrics(out)):
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
        assert second.returncode == 1, second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, err
    assert not (out / LOCK_NAME).exists()
