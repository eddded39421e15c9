"""Training checkpoints: `OUTPUT/checkpoint-STEP/`, written atomically, the last K kept, resumable exactly.

A checkpoint holds:
- the adapter in PEFT format (usable on its own, like the final one);
- `optimizer.safetensors` + `optimizer.json`: the whole AdamW state keyed by parameter names (torch's
  distributed state-dict layout, gathered under FSDP2, so the same files whatever the number of ranks;
  every rank reads them whole on resume and keeps its shard). Tensors go to safetensors, the rest (param
  groups, non-tensor values) to JSON;
- `trainer_state.json`: step, world size, scheduler, data iterator position, grad scaler, config;
- one `rng_state_RANK.json` per rank (torch CPU/CUDA, Python, NumPy generators).

Nothing is pickled, and nothing qdora reads is unpickled: a checkpoint from a shared disk or a colleague
cannot run code on resume. A folder with pickle files (`*.pt`, from qdora 0.1) is refused with a message.
Resuming needs the same micro_batch × ranks layout (the data iterator refuses another one, before anything
is written).

Atomicity: everything goes into `.checkpoint-STEP.tmp/` first and is renamed in one `os.replace`, so a
crash never leaves a half-written `checkpoint-STEP` (a leftover `.tmp` folder is removed by the next save
of that step); a failed write (full disk, lost permission) removes the temporary folder at once and says
which checkpoint to resume from. With several ranks, rank 0 creates and renames the folder; the others
write only their RNG file in between (barriers around it). Multi-node runs need OUTPUT on a filesystem all
nodes share.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qdora.core.adapt import AdapterSpec
from qdora.core.adapter_io import load_adapter_tensors, save_adapter
from qdora.errors import QdoraError
from qdora.io.os_errors import writing
from qdora.train.distributed import Dist
from qdora.train.rng_state import rng_state

PREFIX = "checkpoint-"
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_REST = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
PICKLED = ("optimizer.pt", "trainer_state.pt", "rng_state_0.pt")


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.json"


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
    if not (path / TRAINER_STATE).is_file() and not any((path / name).is_file() for name in PICKLED):
        raise QdoraError(f"--resume {resume}: not a qdora checkpoint folder (no {TRAINER_STATE})")
    return path


# --- writing: each step of a checkpoint is one function (the crash tests stop a run at each of them) ---

def _write_adapter(tmp: Path, spec: AdapterSpec, adapter_state: dict[str, torch.Tensor], base_model: str,
                   provenance: dict | None) -> None:
    save_adapter(None, tmp, spec, base_model=base_model, state=adapter_state, provenance=provenance)


def _write_optimizer(tmp: Path, optimizer_state: dict) -> None:
    """The optimizer state dict ({state: {name: {key: value}}, param_groups}) as safetensors + JSON."""
    tensors, rest = {}, {}
    for name, values in optimizer_state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state/{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                rest.setdefault(name, {})[key] = value
    save_file(tensors, str(tmp / OPTIMIZER_TENSORS), metadata={"format": "pt"})
    meta = {"param_groups": optimizer_state["param_groups"], "state": rest}
    (tmp / OPTIMIZER_REST).write_text(json.dumps(meta, indent=1) + "\n")


def _write_trainer(tmp: Path, trainer_state: dict[str, Any]) -> None:
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")


def _write_rng(tmp: Path, rank: int) -> None:
    (tmp / rng_file(rank)).write_text(json.dumps(rng_state()) + "\n")


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


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
    with writing(final, f"checkpoint {step}", _tensor_bytes(adapter_state, optimizer_state), resume_hint(out)):
        try:
            if dist_.main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                _write_adapter(tmp, spec, adapter_state, base_model, provenance)
                _write_optimizer(tmp, optimizer_state)
                _write_trainer(tmp, {**trainer_state, "step": step, "world_size": dist_.world_size})
            dist_.barrier()
            _write_rng(tmp, dist_.rank)
            dist_.barrier()
            if dist_.main:
                _publish(tmp, final)
                prune(out, keep)
        except BaseException:
            if dist_.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist_.barrier()
    return final


def _tensor_bytes(*states: Any) -> int:
    """Bytes of every tensor in nested dicts/lists: what a checkpoint needs on disk, give or take its JSON."""
    total, todo = 0, list(states)
    while todo:
        x = todo.pop()
        if torch.is_tensor(x):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return total


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


# --- reading: JSON and safetensors only ---

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise QdoraError(f"checkpoint file {path} is missing") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QdoraError(f"checkpoint file {path} is not JSON (qdora reads no other format here; it never "
                         f"unpickles): {e}") from e


def _read_optimizer(path: Path) -> dict:
    try:
        tensors = load_file(str(path / OPTIMIZER_TENSORS))
    except FileNotFoundError as e:
        raise QdoraError(f"checkpoint file {path / OPTIMIZER_TENSORS} is missing") from e
    except Exception as e:  # safetensors raises its own SafetensorError for anything not safetensors
        raise QdoraError(f"checkpoint file {path / OPTIMIZER_TENSORS} is not a safetensors file: {e}") from e
    meta = _read_json(path / OPTIMIZER_REST)
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in meta.get("state", {}).items()}
    for key, tensor in tensors.items():
        _, name, field = key.split("/", 2)
        state.setdefault(name, {})[field] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def load_checkpoint(path: Path, dist_: Dist) -> dict[str, Any]:
    """Everything a checkpoint holds, read (not applied yet): adapter tensors, trainer, optimizer and this
    rank's RNG state. Read before the run writes anything, so a damaged or foreign checkpoint is refused
    with nothing written."""
    if not (path / TRAINER_STATE).is_file() and any((path / name).is_file() for name in PICKLED):
        raise QdoraError(f"checkpoint {path} was written with pickle files (qdora 0.1): qdora no longer reads "
                         "pickles (loading one can run code); start a new run, or resume with the qdora "
                         "version that wrote it")
    trainer = _read_json(path / TRAINER_STATE)
    optim = _read_optimizer(path)
    rng_path = path / rng_file(dist_.rank)
    rng = _read_json(rng_path) if rng_path.is_file() else None
    return {"adapter": load_adapter_tensors(path), "trainer": trainer, "optimizer": optim, "rng": rng}
