"""What a run reports: `metrics.jsonl` (one JSON object per logged step), a tqdm bar, and the trackers of
`--report-to` (TensorBoard, wandb, MLflow: `qdora.train.reporters`).

Only rank 0 writes or shows anything. Peak memory is CUDA's max allocated bytes on GPU, the process's
peak RSS on CPU. On resume the file keeps the rows up to the resumed step and continues from there.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from qdora.io.os_errors import writing
from qdora.train.reporters import Reporter, metric_name


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated (GiB) on GPU; peak resident set size of this process (GiB) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


class Metrics:
    """metrics.jsonl + progress bar + trackers, all no-ops off rank 0.

    A context manager: leaving it on an exception closes the trackers' run as failed (interrupted for
    KeyboardInterrupt); `close(status)` closes it as done/interrupted; closing twice does nothing.
    """

    def __init__(self, output: Path, enabled: bool, total_steps: int, start_step: int,
                 reporters: list[Reporter] | None = None):
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.bar = None
        self.reporters = list(reporters or []) if enabled else []
        self.closed = False
        if not enabled:
            return
        if start_step > 0 and self.path.exists():  # resume: drop rows the resumed run will write again
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.5)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with writing(self.path, "the metrics log"), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {metric_name(k): float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for reporter in self.reporters:
            reporter.log(scalars, row["step"])
        if self.bar is not None and "loss" in row:
            norm = {"gnorm": f"{row['grad_norm']:.3g}"} if "grad_norm" in row else {}
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", **norm, lr=f"{row['lr']:.2e}",
                                 tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['peak_mem_gb']:.2f}G",
                                 refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, message: str) -> None:
        """A line above the bar (rank 0)."""
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)

    def close(self, status: str = "done") -> None:
        """End the bar and the trackers' run (`status`: done, interrupted or failed)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._close_reporters(status)

    def _close_reporters(self, status: str) -> None:
        if self.closed:
            return
        self.closed = True
        errors = []
        for reporter in self.reporters:  # every one is closed, even if an earlier one fails
            try:
                reporter.close(status)
            except Exception as e:  # a tracker that cannot close must not hide the run's own outcome
                errors.append(f"{type(reporter).__name__}: {e}")
        if errors:
            import logging

            logging.getLogger("qdora.train.metrics").warning("closing trackers: %s", "; ".join(errors))

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.close("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
