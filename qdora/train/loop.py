"""`qdora train`: the setup phases, then the training loop itself, then the final adapter.

    check_inputs → setup_data → (lock OUTPUT) → setup_model → setup_optimizer → resume → loop → save_final

The phases are in `qdora.train.setup`, the step and evaluation in `qdora.train.step`, checkpoints in
`qdora.train.save`; they share one `RunState`. This module keeps the loop visible: fetch the micro batches
of a step, step, log, evaluate, checkpoint, stop on a signal.

Stops: SIGINT/SIGTERM finish the current step, write a checkpoint and end with status `interrupted`
(the CLI exits 128+signal). A non-finite loss stops before the optimizer step (the newest checkpoint is
kept). CUDA out of memory becomes one message saying what to lower.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from qdora.errors import QdoraError, doing
from qdora.io.failures import WriteFailure
from qdora.io.os_errors import as_write_failure, writing
from qdora.train.checkpoint import resume_hint
from qdora.train.config import TrainConfig
from qdora.train.distributed import Dist, setup_distributed, teardown_distributed
from qdora.train.metrics import Metrics, peak_memory_gb
from qdora.train.reporters import open_reporters
from qdora.train.run_lock import RunLock
from qdora.train.save import save, save_final
from qdora.train.setup import check_inputs, resume, setup_data, setup_model, setup_optimizer
from qdora.train.state import RunState
from qdora.train.step import check_deferred, evaluate, train_step


@dataclass
class TrainResult:
    """What a run did: for the CLI's last line and for tests (the model is the in-memory trained one)."""

    output: Path
    step: int
    status: str  # done | interrupted
    losses: dict[int, float] = field(default_factory=dict)
    model: nn.Module | None = None
    checkpoint: Path | None = None
    signal: int | None = None


class _Stop:
    """SIGINT/SIGTERM → a flag the loop checks after each step (installed only in the main thread).

    A second signal raises KeyboardInterrupt at once (no checkpoint) for a user who cannot wait.
    """

    def __init__(self):
        self.signum: int | None = None

    @contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signum is not None:  # a second signal: stop now, without the checkpoint
                raise KeyboardInterrupt
            self.signum = signum

        for s in old:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def train(cfg: TrainConfig) -> TrainResult:
    """Run `qdora train` with a resolved config (see `qdora.train.config`). Raises QdoraError on bad input."""
    cfg.validate()
    d = setup_distributed(cfg.device, cfg.offload_params)
    try:
        with ExitStack() as stack:  # closes the trackers' run as failed if the run raises
            return _run(cfg, d, stack)
    except WriteFailure as e:  # a full disk or lost permission: say what the run can continue from
        failure = e.with_hint(resume_hint(cfg.output))
        if failure is e:
            raise
        raise failure from e
    except QdoraError:
        raise
    except torch.OutOfMemoryError as e:
        raise QdoraError(
            f"CUDA out of memory ({e.__class__.__name__}): lower --micro-batch (now {cfg.micro_batch}) or "
            f"--seq-len (now {cfg.seq_len}), or offload (--offload activations, params or all; now "
            f"{cfg.offload}); more --grad-accum keeps the global batch"
        ) from e
    except Exception as e:  # a full disk or lost permission outside a checkpoint (metrics, final adapter)
        failure = as_write_failure(e, getattr(e, "filename", None) or cfg.output, "the run's output",
                                   hint=resume_hint(cfg.output))
        if failure is None:
            raise
        raise failure from e
    finally:
        teardown_distributed(d)


def _run(cfg: TrainConfig, d: Dist, stack: ExitStack) -> TrainResult:
    with doing("checking the inputs"):
        s, tokenizer = check_inputs(cfg, d)
    with doing("preparing the data"):
        setup_data(s, tokenizer)
    lock = RunLock(s.out, enabled=d.main)  # one run per OUTPUT; rank 0 holds it for all ranks
    try:
        _lock(lock, d)
        with doing("loading the model"):
            setup_model(s)
        if d.main:
            with writing(s.out / "train_config.yaml", "the run's config"):
                (s.out / "train_config.yaml").write_text(cfg.to_yaml(resolved=s.provenance))
        d.barrier()
        setup_optimizer(s)
        torch.manual_seed(cfg.seed + d.rank)  # dropout masks (a resumed run restores the saved generators)
        if s.resumed is not None:
            resume(s)
        return _loop(s, stack)
    finally:
        lock.release()


def _lock(lock: RunLock, d: Dist) -> None:
    """Rank 0 takes the lock (creating OUTPUT); every rank learns whether it got it."""
    refused = None
    if d.main:
        try:
            lock.acquire()
        except QdoraError as e:
            refused = e
    if d.any(refused is not None):
        raise refused or QdoraError(f"rank 0 could not lock {lock.out}")


def _next_batches(it: Iterator[dict[str, torch.Tensor]], n: int) -> list[dict]:
    """Up to `n` micro batches (one optimizer step), on the host (the step counts their tokens there and
    copies them); fewer only when the data ends."""
    batches = []
    for _ in range(n):
        b = next(it, None)
        if b is None:
            break
        batches.append(b)
    return batches


class _Due(NamedTuple):
    """What happens after a step: evaluation, a metrics row (always with an evaluation), a checkpoint."""

    evaluate: bool
    log: bool
    save: bool

    @property
    def reported(self) -> bool:
        """The step's loss must reach the host (otherwise it stays on the device: no sync)."""
        return self.log or self.save


def _due(s: RunState, step: int) -> _Due:
    cfg, last = s.cfg, step == s.total_steps
    evaluate = s.eval_batches is not None and bool(cfg.eval_every and step % cfg.eval_every == 0 or last)
    log = step % cfg.log_every == 0 or last or evaluate
    return _Due(evaluate, log, bool(cfg.save_every and step % cfg.save_every == 0) and not last)


def _loop(s: RunState, stack: ExitStack) -> TrainResult:
    cfg, d = s.cfg, s.dist
    reporters = open_reporters(cfg.reporters, s.out, {**cfg.to_dict(), "resolved": s.provenance}, cfg.run_name,
                               cfg.project) if d.main else []
    metrics = stack.enter_context(Metrics(s.out, d.main, s.total_steps, s.step, reporters))
    if d.main:
        metrics.write(f"qdora: {s.report.summary()}")
        metrics.write(f"qdora: {s.data.stats.rows} rows, {s.data.stats.trained_tokens} trained tokens; "
                      f"{s.total_steps} steps of {cfg.micro_batch}×{cfg.grad_accum}×{d.world_size} rows"
                      + (f"; resumed from {s.resume_from} at step {s.step}" if s.resume_from else ""))
    result = TrainResult(s.out, s.step, "done")
    batches = iter(s.batches)
    stop = _Stop()
    window_tokens, window_start = 0, time.perf_counter()
    with stop.installed():
        while s.step < s.total_steps:
            micro_batches = _next_batches(batches, cfg.grad_accum)
            if not micro_batches:
                break
            due = _due(s, s.step + 1)
            with doing(f"training step {s.step + 1}"):
                done = train_step(s, micro_batches, report=due.reported)
            if done.loss is not None:
                result.losses[s.step] = done.loss
            window_tokens += done.input_tokens
            if done.spike:  # --on-spike warn: say so above the bar and in the log, and carry on
                metrics.write(f"qdora: WARNING {done.spike}")
            extra = {"eval_loss": evaluate(s)} if due.evaluate else {}
            if due.log:
                now = time.perf_counter()
                metrics.log({"step": s.step, "loss": done.loss, "grad_norm": done.grad_norm, "lr": done.lr,
                             "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                             "peak_mem_gb": peak_memory_gb(d.device), "epoch": s.batches.epoch,
                             **({"spike": True} if done.spike else {}), **extra})
                window_tokens, window_start = 0, now
            metrics.advance()
            if due.save:
                save(s)
            if d.any(stop.signum is not None):
                check_deferred(s)  # never save weights past a skipped non-finite step without saying so
                save(s)
                result.status, result.signal = "interrupted", stop.signum or signal.SIGTERM
                break
    metrics.close("interrupted" if result.status == "interrupted" else "done")
    result.step, result.checkpoint = s.step, s.last_checkpoint
    if result.status == "done":
        save_final(s)
    result.model = s.model
    return result
