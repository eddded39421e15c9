"""Tiny training runs for tests and benchmarks: datasets in each format, a fast small config, metrics."""

from __future__ import annotations

import json
from pathlib import Path

from qdora.testing.demo_data import demo_corpus, demo_records
from qdora.train.config import TrainConfig, resolve_config

# Threads are capped in every test process: 2 shared cores, and oversubscription makes steps 4x slower.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_data(tmp: Path, n: int = 64) -> Path:
    return write_jsonl(tmp / "alpaca.jsonl", demo_records(n))


def chat_data(tmp: Path, n: int = 32) -> Path:
    rows = [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}]} for r in demo_records(n)]
    return write_jsonl(tmp / "chat.jsonl", rows)


def text_data(tmp: Path, n: int = 64) -> Path:
    return write_jsonl(tmp / "text.jsonl", [{"text": t} for t in demo_corpus(n)])


def small_config(model: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    """A few-second run on the tiny model: fp32 compute on CPU (exact comparisons), short rows."""
    values = dict(model=str(model), data=str(data), output=str(output), rank=4, alpha=8.0, lr=3e-3,
                  seq_len=128, micro_batch=2, max_steps=4, dtype="fp32", device="cpu", log_every=1)
    values.update(overrides)
    return resolve_config({}, values)


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines() if line.strip()]
