"""Resume is exact: 6 steps straight == 3 steps, checkpoint, 3 resumed steps; SIGTERM saves and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qdora.testing.runs import (
    SUBPROCESS_ENV,
    alpaca_data,
    metrics,
    small_config,
)
from qdora.train.loop import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # in-process training: one thread


ROOT = Path(__file__).resolve().parents[2]


def test_resume_reproduces_the_uninterrupted_run(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    # dropout and grad accumulation make RNG restore and the data position matter
    kw = dict(max_steps=6, save_every=3, keep=0, dropout=0.1, grad_accum=2, warmup_steps=2, lr=1e-2)
    straight = train(small_config(tiny_llama_dir, data, tmp_path / "a", **kw))
    assert (tmp_path / "a" / "checkpoint-3").is_dir()

    resumed = train(small_config(tiny_llama_dir, data, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"),
                                 **kw))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed.losses[step] - straight.losses[step]) <= 1e-6, (step, resumed.losses, straight.losses)
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    # metrics of the resumed run continue at step 4
    assert [r["step"] for r in metrics(tmp_path / "b")] == [4, 5, 6]


def test_sigterm_writes_a_checkpoint_and_resume_latest_continues(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qdora.cli", "train", "--model", str(tiny_llama_dir), "--data", str(data),
           "--output", str(out), "--max-steps", "10000", "--micro-batch", "2", "--seq-len", "128", "--rank", "4",
           "--dtype", "fp32", "--device", "cpu", "--scheduler", "constant", "--lr", "1e-3"]
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2
        ):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "interrupted at step" in err
    ckpts = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert len(ckpts) == 1 and not any(p.name.startswith(".") for p in out.iterdir())
    stopped = int(ckpts[0].split("-")[1])
    assert stopped >= 2 and not (out / "adapter_model.safetensors").exists()

    resumed = train(small_config(tiny_llama_dir, data, out, resume="latest", max_steps=stopped + 2,
                                 scheduler="constant", lr=1e-3))
    assert resumed.status == "done" and sorted(resumed.losses) == [stopped + 1, stopped + 2]
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped + 3))
    assert (out / "adapter_model.safetensors").is_file()
