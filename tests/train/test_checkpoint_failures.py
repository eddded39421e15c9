"""`qdora train` on a disk that fills up or a folder it cannot write: one message naming the checkpoint and
the last good one, exit 1, no `.checkpoint-N.tmp` left, and the run resumes once there is room."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.testing.runs import alpaca_data, metrics

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def run(model, data, out, *extra, checkpoints: bool = True):
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "3",
            "--seq-len", "128", "--rank", "4", "--dtype", "fp32", "--device", "cpu", "--keep", "0", *extra]
    if checkpoints:
        args += ["--save-every", "1"]
    return CliRunner().invoke(main, args)


def one_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if "Error: " in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.output  # the progress bar ended first
    return errors[0]


def test_disk_full_while_writing_a_checkpoint_then_resume(tiny_llama_dir, tmp_path, small_disk):
    """A tiny checkpoint is ~180 kB on tmpfs: 256 kB holds the first, not the second."""
    disk = small_disk(256 * 1024)
    out = disk / "run"
    line = one_error(run(tiny_llama_dir, alpaca_data(tmp_path), out))
    assert f"cannot write checkpoint 2 to {out / 'checkpoint-2'}: no space left on the device" in line
    assert "(it needs 1" in line and "kB, " in line  # adapter + optimizer tensors: ~150 kB
    assert f"the last good checkpoint is {out / 'checkpoint-1'} (continue from it with --resume latest)" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl", "train_config.yaml"]

    small_disk.resize(disk, 4 << 20)  # the user frees space
    result = run(tiny_llama_dir, alpaca_data(tmp_path), out, "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


def test_unwritable_output_refused_before_training(tiny_llama_dir, tmp_path, unwritable_dir):
    folder, words = unwritable_dir
    line = one_error(run(tiny_llama_dir, alpaca_data(tmp_path), folder / "run"))
    assert f"cannot write the run folder to {folder / 'run'}" in line and words in line


def test_disk_full_while_logging_metrics(tiny_llama_dir, tmp_path, small_disk):
    """Outside a checkpoint (here metrics.jsonl, on a two-page disk): the same one message, naming the file."""
    disk = small_disk(8 * 1024)
    out = disk / "run"
    line = one_error(run(tiny_llama_dir, alpaca_data(tmp_path), out, checkpoints=False))
    assert f"cannot write the metrics log to {out / 'metrics.jsonl'}: no space left on the device" in line
    assert "no checkpoint was written yet" in line
