"""The speed harness end to end on the tiny shape (CPU, 2 steps per method): structure and correctness.

All four methods start from B = 0 on the same NF4 bytes, so their first-step losses must agree; a
difference would mean the benchmark compares different models (or a layer computes the wrong thing).
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.bench_model import METHODS
from benchmarks.train_step import main, markdown, run

pytestmark = pytest.mark.slow  # four methods trained end to end


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "r.json"
    rep = run(["--shape", "tiny", "--seq-len", "64", "--steps", "2", "--warmup", "0", "--device", "cpu",
               "--json", str(out)])
    assert json.loads(out.read_text())["results"][0]["method"] == rep["results"][0]["method"]
    return rep


def test_report_structure(report):
    assert [r["method"] for r in report["results"]] == list(METHODS)
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(report["versions"])
    assert report["matmul_flops_per_s"] > 0 and report["model_flops_per_step"] > 0
    for r in report["results"]:
        assert len(r["step_times_s"]) == 2 and len(r["losses"]) == 2
        assert r["median_step_s"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert r["peak_bytes"] > r["model_bytes"] > 0
        assert all(math.isfinite(x) for x in r["losses"])
    table = markdown(report)
    assert table.count("\n| ") == 2 + len(METHODS) - 1 and "bitsandbytes" in table


def test_first_step_losses_agree(report):
    by = {r["method"]: r for r in report["results"]}
    ref = by["qdora-lora"]["loss_step0"]
    assert abs(ref - math.log(1024)) < 0.5  # random init: about ln(vocab)
    for m in METHODS:
        assert by[m]["loss_step0"] == pytest.approx(ref, rel=2e-3), m
    # the same optimizer on the same gradients: the adapters train (loss moves) in every method
    assert all(r["losses"][1] != r["losses"][0] for r in report["results"])


def test_trainable_counts_match_peft(report):
    by = {r["method"]: r["trainable_params"] for r in report["results"]}
    assert by["qdora-dora"] == by["peft-qdora"] and by["qdora-lora"] == by["peft-qlora"]
    assert by["qdora-dora"] > by["qdora-lora"]


def test_bad_arguments_exit_nonzero(capsys):
    assert main(["--methods", "qdora-dora,nonsense"]) == 2
    assert main(["--shape", "nope"]) == 2
    assert main(["--steps", "0"]) == 2
    assert "error:" in capsys.readouterr().err


def test_chunked_loss_matches_full_loss_and_plan():
    """--loss chunked (qdora/train/loss.py on the hidden states) gives transformers' loss at step 0, and the
    planner's chunked-loss prediction matches the measured peak (at this shape a layer's recompute, not the
    logits, sets the peak, so both losses peak alike)."""
    from qdora.tools.plan import plan_memory
    from qdora.tools.presets import preset_config

    args = ["--shape", "tiny", "--seq-len", "256", "--steps", "1", "--warmup", "0", "--device", "cpu",
            "--methods", "qdora-dora"]
    full = run(args)["results"][0]
    chunked = run(args + ["--loss", "chunked", "--loss-chunk", "64"])["results"][0]
    assert chunked["loss_step0"] == pytest.approx(full["loss_step0"], rel=1e-3)
    plan = plan_memory(preset_config("tiny"), gpus=1, seq_len=256, loss="chunked", loss_chunk=64, embeddings="device")
    assert plan.allocated_bytes == pytest.approx(chunked["peak_bytes"], rel=0.10)
