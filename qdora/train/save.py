"""What a run writes: `save` (a resumable checkpoint) and `save_final` (the finished adapter).

Both are collectives under FSDP2 (the adapter and optimizer state are gathered on every rank); rank 0
writes the files (`qdora.train.checkpoint` for the checkpoint layout and its atomic rename).
"""

from __future__ import annotations

from pathlib import Path

from qdora.core.adapter_io import adapter_state_dict, save_adapter
from qdora.errors import doing
from qdora.train.checkpoint import save_checkpoint
from qdora.train.distributed import optimizer_state
from qdora.train.state import RunState


def save(s: RunState) -> Path:
    """checkpoint-STEP: adapter, optimizer, schedule, data position, scaler, config, every rank's RNG."""
    adapter = adapter_state_dict(s.model)
    optimizer = optimizer_state(s.model, s.optimizer)
    trainer = {"scheduler": s.scheduler.state_dict(), "data": s.batches.state_dict(),
               "scaler": s.scaler.state_dict() if s.scaler is not None else None,
               "spike": s.spike.state_dict(), "config": s.cfg.to_dict()}
    with doing(f"writing checkpoint {s.step}"):
        s.last_checkpoint = save_checkpoint(s.out, s.step, s.dist, s.spec, adapter, optimizer, trainer,
                                            s.base_model, s.cfg.keep, s.provenance)
    return s.last_checkpoint


def save_final(s: RunState) -> None:
    """The trained adapter in PEFT format, in OUTPUT itself."""
    adapter = adapter_state_dict(s.model)
    if s.dist.main:
        save_adapter(None, s.out, s.spec, base_model=s.base_model, state=adapter, provenance=s.provenance)
    s.dist.barrier()
