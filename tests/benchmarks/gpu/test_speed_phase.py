"""The standing GPU issue's goals, computed from one speed run's results."""

from __future__ import annotations

from benchmarks.gpu.speed_phase import ORDER, goals


def _r(step_s: float, peak: float, tokens: int = 2048) -> dict:
    return dict(median_step_s=step_s, tokens_per_s=tokens / step_s, peak_bytes=peak)


def test_peft_rows_come_first():
    assert ORDER.split(",")[:2] == ["peft-qlora", "peft-qdora"]


def test_goals_met_and_missed():
    by = {"peft-qlora": _r(0.69, 10), "peft-qdora": _r(1.18, 12), "qdora-dora": _r(0.30, 9),
          "qdora-lora": _r(0.28, 8)}
    got = {name: (ok, value) for name, ok, value in goals(by)}
    assert got["qdora dora tok/s >= 2.0x PEFT QLoRA"] == (True, "2.30x")
    assert got["qdora dora tok/s >= 3.4x PEFT QDoRA"] == (True, "3.93x")
    assert got["qdora dora step <= 1.10x qdora lora"] == (True, "1.07x")
    assert got["qdora dora peak <= 0.8x PEFT QDoRA"] == (True, "0.75x")
    by["qdora-dora"] = _r(0.40, 11)
    got = {name: ok for name, ok, _ in goals(by)}
    assert not any(got.values())


def test_a_failed_method_fails_the_goals():
    by = {"peft-qlora": _r(0.69, 10), "peft-qdora": {"method": "peft-qdora", "error": "out of memory"},
          "qdora-dora": _r(0.3, 9), "qdora-lora": _r(0.28, 8)}
    [(name, ok, detail)] = goals(by)
    assert not ok and detail == "peft-qdora"
