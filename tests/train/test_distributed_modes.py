"""2 gloo ranks on CPU (torchrun, FSDP2) in each storage layout and each --offload mode the CPU can run.

bf16-viewed NF4 bytes (torch < 2.13's layout, forced here with QDORA_NF4_STORAGE) are sharded without a
casting policy and computed under autocast (the byte-safe policy); uint8 bytes under FSDP2's
MixedPrecisionPolicy. Both must train like the single fp32 process within bf16 rounding (a wrong cast
or a missing autocast would show as an O(1e-1) difference). CPU copies never corrupt the bytes, so the
bit-level proof is the GPU check's storage phase; `--offload params/all` need a CUDA device (its tests
phase runs them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qdora.testing.runs import SUBPROCESS_ENV, alpaca_data, metrics, small_config
from qdora.train.distributed import free_port
from qdora.train.loop import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "qdora.cli", "train", *args]
    proc = subprocess.run(cmd, env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def even_blocks_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose rows hold an even number of NF4 blocks (128 and 256 inputs), as every real model
    does: bf16-viewed storage packs two absmax bytes per bf16 word."""
    from qdora.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("even") / "llama", hidden_size=128, intermediate_size=256)


@pytest.mark.parametrize(("storage", "offload"), [("bfloat16", "none"), ("bfloat16", "activations"),
                                                  ("uint8", "activations")])
def test_two_bf16_ranks_train_like_one_fp32_process(storage, offload, even_blocks_dir, tmp_path):
    tiny_llama_dir = even_blocks_dir
    data = alpaca_data(tmp_path)
    out = tmp_path / "two"
    torchrun("--model", str(tiny_llama_dir), "--data", str(data), "--max-steps", "2", "--seq-len", "128",
             "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--device", "cpu", "--micro-batch", "1",
             "--dtype", "bf16", "--offload", offload, "--output", str(out), env={"QDORA_NF4_STORAGE": storage})
    ref = train(small_config(tiny_llama_dir, data, tmp_path / "fp32", max_steps=2, micro_batch=2, lr=1e-2))
    got = {r["step"]: r["loss"] for r in metrics(out)}
    for step in (1, 2):
        assert abs(got[step] - ref.losses[step]) <= 1e-2 * ref.losses[step], (got, ref.losses)
    assert (out / "adapter_model.safetensors").is_file()
