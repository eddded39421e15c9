"""A run killed (SIGKILL) at each step of writing a checkpoint resumes with `--resume latest` to exactly the
losses and adapter of the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qdora.testing.crash_worker import POINTS
from qdora.testing.runs import SUBPROCESS_ENV, alpaca_data, metrics, small_config
from qdora.train.loop import train
from qdora.train.run_lock import LOCK_NAME

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]
# dropout and grad accumulation make the RNG state and the data position matter
OPTIONS = dict(max_steps=6, save_every=2, keep=0, dropout=0.1, grad_accum=2, warmup_steps=2, lr=1e-2)


@pytest.fixture(scope="module")
def straight(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    data = alpaca_data(tmp)
    result = train(small_config(tiny_llama_dir, data, tmp / "run", **OPTIONS))
    return data, tmp / "run", result.losses


@pytest.mark.parametrize("point", list(POINTS))
def test_crash_while_writing_a_checkpoint_then_resume_latest(tiny_llama_dir, straight, tmp_path, point):
    data, straight_dir, losses = straight
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qdora.testing.crash_worker", point, "2", str(tiny_llama_dir), str(data), str(out),
           json.dumps(OPTIONS)]
    proc = subprocess.run(cmd, env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # killed while writing checkpoint-4: checkpoint-2 is the newest complete one, nothing claims to be step 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert (out / ".checkpoint-4.tmp").is_dir()
    assert (out / LOCK_NAME).is_file()  # the dead run's lock: stale, taken over below

    resumed = train(small_config(tiny_llama_dir, data, out, resume="latest", **OPTIONS))
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    assert {s: resumed.losses[s] for s in (3, 4, 5, 6)} == {s: losses[s] for s in (3, 4, 5, 6)}
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint-"))) == \
        ["checkpoint-2", "checkpoint-4"]  # the leftover temporary folder is gone, and so is the lock
    a = load_file(str(straight_dir / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
