"""2 gloo ranks on CPU (torchrun, FSDP2) train exactly like 1 process over the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
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
from qdora.train.distributed import free_port
from qdora.train.loop import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # in-process training: one thread


ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "qdora.cli", "train", *args]
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_match_one_process(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    common = ["--model", str(tiny_llama_dir), "--data", str(data), "--max-steps", "4", "--seq-len", "128",
              "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--dtype", "fp32", "--device", "cpu",
              "--grad-accum", "2", "--save-every", "2", "--keep", "0"]
    two = tmp_path / "two"
    torchrun(*common, "--output", str(two), "--micro-batch", "1")

    one = train(small_config(tiny_llama_dir, data, tmp_path / "one", max_steps=4, micro_batch=2, grad_accum=2,
                             lr=1e-2, save_every=2, keep=0))
    two_losses = {r["step"]: r["loss"] for r in metrics(two)}
    assert sorted(two_losses) == [1, 2, 3, 4]
    for step, loss in one.losses.items():
        assert abs(two_losses[step] - loss) <= 1e-5 * abs(loss), (step, two_losses[step], loss)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # Adam turns float noise in near-zero gradients into O(lr·1e-4) weight differences: measured max 2e-6
    worst = max((b[k] - a[k]).abs().max().item() for k in a)
    assert worst <= 2e-5, worst
    # the gathered optimizer state has the same layout (names) as the single-process one
    oa = load_file(str(tmp_path / "one" / "checkpoint-2" / "optimizer.safetensors"))
    ob = load_file(str(two / "checkpoint-2" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys()
    name = next(k for k in oa if k.endswith("/exp_avg"))
    torch.testing.assert_close(ob[name], oa[name], rtol=1e-4, atol=1e-8)
    assert (two / "checkpoint-2" / "rng_state_1.json").is_file()

    # resuming the sharded run from its checkpoint (every rank loads the full optimizer state, keeps its
    # shard) reproduces its steps 3 and 4 exactly
    torchrun(*common, "--output", str(tmp_path / "two-resumed"), "--micro-batch", "1",
             "--resume", str(two / "checkpoint-2"))
    again = {r["step"]: r["loss"] for r in metrics(tmp_path / "two-resumed")}
    assert again == {3: two_losses[3], 4: two_losses[4]}


def test_two_ranks_bf16_mixed_precision_trains_like_fp32(tiny_llama_dir, tmp_path):
    """MixedPrecisionPolicy(bf16, reduce fp32) casts the float params only: corrupted NF4 bytes would give
    an O(1) different loss, bf16 compute gives ~1e-3."""
    data = alpaca_data(tmp_path)
    common = ["--model", str(tiny_llama_dir), "--data", str(data), "--max-steps", "2", "--seq-len", "128",
              "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--device", "cpu", "--micro-batch", "1"]
    torchrun(*common, "--output", str(tmp_path / "bf16"), "--dtype", "bf16")
    ref = train(small_config(tiny_llama_dir, data, tmp_path / "fp32", max_steps=2, micro_batch=2, lr=1e-2))
    got = {r["step"]: r["loss"] for r in metrics(tmp_path / "bf16")}
    for step in (1, 2):
        assert abs(got[step] - ref.losses[step]) <= 1e-2 * ref.losses[step], (got, ref.losses)


def test_two_ranks_clip_and_log_the_norm_like_one_process(tiny_llama_dir, tmp_path):
    """--max-grad-norm under FSDP2 (DTensor gradient shards) with accumulation: the clip uses the global norm,
    once per step, so 2 ranks × micro-batch 1 × accumulation 2 equal 1 process × micro-batch 2 × accumulation
    2 in losses and in the logged norms, with the limit active on every step. Also: the memory modes that
    touch the root group (NF4 lm_head, host embedding) under FSDP2."""
    data = alpaca_data(tmp_path)
    common = ["--model", str(tiny_llama_dir), "--data", str(data), "--max-steps", "3", "--seq-len", "128",
              "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--dtype", "fp32", "--device", "cpu",
              "--grad-accum", "2", "--max-grad-norm", "0.05", "--lm-head", "nf4", "--embeddings", "host"]
    torchrun(*common, "--output", str(tmp_path / "two"), "--micro-batch", "1")
    one = train(small_config(tiny_llama_dir, data, tmp_path / "one", max_steps=3, micro_batch=2, grad_accum=2,
                             lr=1e-2, max_grad_norm=0.05, lm_head="nf4", embeddings="host"))
    two = {r["step"]: r for r in metrics(tmp_path / "two")}
    ref = {r["step"]: r for r in metrics(tmp_path / "one")}
    assert sorted(two) == [1, 2, 3]
    for step, loss in one.losses.items():
        assert abs(two[step]["loss"] - loss) <= 1e-5 * abs(loss), (step, two[step], loss)
        assert ref[step]["grad_norm"] > 0.05  # the limit is active
        assert abs(two[step]["grad_norm"] - ref[step]["grad_norm"]) <= 1e-4 * ref[step]["grad_norm"]


def test_two_ranks_resume_exactly_with_dropout_and_accumulation(tiny_llama_dir, tmp_path):
    """Each rank's RNG file (JSON) restores its own dropout masks: the resumed sharded run repeats the
    uninterrupted one's losses exactly."""
    data = alpaca_data(tmp_path)
    common = ["--model", str(tiny_llama_dir), "--data", str(data), "--max-steps", "4", "--seq-len", "128",
              "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--dtype", "fp32", "--device", "cpu", "--micro-batch", "1",
              "--grad-accum", "2", "--dropout", "0.1", "--save-every", "2", "--keep", "0"]
    torchrun(*common, "--output", str(tmp_path / "straight"))
    straight = {r["step"]: r["loss"] for r in metrics(tmp_path / "straight")}
    torchrun(*common, "--output", str(tmp_path / "resumed"), "--resume", str(tmp_path / "straight" / "checkpoint-2"))
    resumed = {r["step"]: r["loss"] for r in metrics(tmp_path / "resumed")}
    assert resumed == {3: straight[3], 4: straight[4]}
