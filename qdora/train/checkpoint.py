"""Training checkpoints: `OUTPUT/checkpoint-STEP/`, written atomically, the last K kept, resumable exactly.

A checkpoint holds the adapter in PEFT format (usable on its own, like the final one), `optimizer.pt`
(full AdamW state keyed by parameter names, gathered from FSDP2: the same file whatever the number of
ranks; every rank reads it whole on resume and keeps its shard — adapters are small, so gathering costs
little and needs no distributed-checkpoint folder layout), `trainer_state.pt` (step,
scheduler, data iterator position, metrics bookkeeping), one `rng_state_RANK.pt` per rank (torch CPU/CUDA,
Python, NumPy), and `trainer_state.json` (human-readable summary). Resuming needs the same
micro_batch × ranks layout (the data iterator refuses another one, before anything is written).

Atomicity: everything goes into `.checkpoint-STEP.tmp/` first and is renamed in one `os.replace`, so a
crash never leaves a half-written `checkpoint-STEP`; a failed write (full disk) removes the temporary
folder and says which checkpoint to resume from. With several ranks, rank 0 creates and renames the
folder; the others write only their RNG file in between (barriers around it). Multi-node runs need OUTPUT
on a filesystem all nodes share.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdora.core.adapt import AdapterSpec
from qdora.core.adapter_io import save_adapter
from qdora.errors import QdoraError
from qdora.io.os_errors import writing
from qdora.train.distributed import Dist

PREFIX = "checkpoint-"
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in OUTPUT, oldest first."""
    out = Path(output)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _PATTERN.match(p.name))]
    return sorted(found)


def resolve_resume(output: str | Path, resume: str) -> Path:
    """`latest` -> newest checkpoint in OUTPUT; otherwise a checkpoint folder that must exist."""
    if resume == "latest":
        found = list_checkpoints(output)
        if not found:
            raise QdoraError(f"--resume latest: {output} holds no {PREFIX}STEP folder")
        return found[-1][1]
    path = Path(resume)
    if not (path / "trainer_state.pt").is_file():
        raise QdoraError(f"--resume {resume}: not a qdora checkpoint folder (no trainer_state.pt)")
    return path


def save_checkpoint(
    output: str | Path, step: int, dist_: Dist, spec: AdapterSpec, adapter_state: dict[str, torch.Tensor],
    optimizer_state: dict, trainer_state: dict[str, Any], base_model: str, keep: int,
    provenance: dict | None = None,
) -> Path:
    """Write checkpoint-STEP atomically (collective: every rank calls it), then prune to the last `keep`."""
    out = Path(output)
    final = out / f"{PREFIX}{step}"
    tmp = out / f".{PREFIX}{step}.tmp"
    # A full disk or lost permission: one message naming the checkpoint and the last good one to resume
    # from, and the temporary folder removed (a checkpoint is complete or absent).
    with writing(final, f"checkpoint {step}", hint=resume_hint(out)):
        try:
            if dist_.main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                save_adapter(None, tmp, spec, base_model=base_model, state=adapter_state,
                             provenance=provenance)
                torch.save(optimizer_state, tmp / "optimizer.pt")
                torch.save({**trainer_state, "step": step, "world_size": dist_.world_size},
                           tmp / "trainer_state.pt")
                summary = {"step": step, "world_size": dist_.world_size, "data": trainer_state.get("data")}
                (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n")
            dist_.barrier()
            torch.save(rng_state(), tmp / f"rng_state_{dist_.rank}.pt")
            dist_.barrier()
            if dist_.main:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                prune(out, keep)
        except BaseException:
            if dist_.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist_.barrier()
    return final


def resume_hint(output: str | Path) -> str:
    """What a stopped run can continue from: the newest complete checkpoint, if any."""
    found = list_checkpoints(output)
    if not found:
        return "no checkpoint was written yet (the run would start over)"
    return f"the last good checkpoint is {found[-1][1]} (continue from it with --resume latest)"


def prune(output: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep=0: keep all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(output)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, dist_: Dist) -> dict[str, Any]:
    """The trainer state, optimizer state and this rank's RNG state of a checkpoint (not applied yet)."""
    try:
        trainer = torch.load(path / "trainer_state.pt", weights_only=False)
        optim = torch.load(path / "optimizer.pt", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise QdoraError(f"cannot read checkpoint {path}: {e}") from e
    rng_file = path / f"rng_state_{dist_.rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return {"trainer": trainer, "optimizer": optim, "rng": rng}
