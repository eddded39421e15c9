"""The DoRA paper's weight-decomposition analysis (Liu et al. 2024, §3): how much fine-tuning changed the
magnitude and the direction of each weight's rows.

For a base weight W and a fine-tuned W' (rows = output features):

    ΔM = mean_i | ||W'_i|| − ||W_i|| |          ΔD = mean_i (1 − cos(W'_i, W_i))

The paper finds LoRA's (ΔD, ΔM) points on a positive slope (magnitude and direction change together)
and full fine-tuning's and DoRA's on a negative one. For an adapter, W is the dequantized NF4 base (what
training saw) and W' the merged weight; a fully fine-tuned checkpoint is compared with its base directly.
Weights are streamed: at most one (W, W') pair is in memory at a time.
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict
from pathlib import Path

import torch

from qdora.core.nf4 import nf4_from_weight
from qdora.errors import QdoraError
from qdora.export.adapter_merge import AdapterMerge, block_linear_keys
from qdora.io.atomic import atomic_write
from qdora.io.os_errors import writing
from qdora.io.preflight import check_writable
from qdora.io.weights import WeightReader, is_model_dir
from qdora.options import BASE
from qdora.tools.analyze_plot import plot_rows
from qdora.tools.decomposition import ModuleSummary, Row, decomposition_change, summarize

CSV_NAME, PNG_NAME = "decomposition.csv", "decomposition.png"
_STEP = re.compile(r"checkpoint-(\d+)$")
_LAYER = re.compile(r"\.(\d+)\.")


def _where(key: str) -> tuple[int, str]:
    """`model.layers.3.self_attn.q_proj.weight` -> (3, 'q_proj')."""
    m = _LAYER.search(key)
    return (int(m.group(1)) if m else -1), key.rsplit(".", 2)[-2]


def _row(step: int | None, key: str, w: torch.Tensor, w_new: torch.Tensor) -> Row:
    layer, module = _where(key)
    dm, dd = decomposition_change(w, w_new)
    return Row(step, layer, module, dm, dd)


def step_of(folder: str | Path) -> int | None:
    m = _STEP.search(Path(folder).name)
    return int(m.group(1)) if m else None


def analyze_adapter(
    adapter_dir: str | Path, base_model: str | Path | None = None, base: str = "dequantized",
    step: int | None = None,
) -> list[Row]:
    """Rows for every adapted weight: W = the (dequantized) base, W' = the adapter merged onto it."""
    BASE.check(base)
    plan = AdapterMerge.load(adapter_dir, base_model)
    plan.check_base_kind(base)
    step = step_of(adapter_dir) if step is None else step
    rows = []
    for key in sorted(plan.adapters, key=_where):
        w = plan.base_weight(key, plan.weight(key), base)
        rows.append(_row(step, key, w, plan.merged(key, w)))
        del w
    return rows


def analyze_checkpoints(checkpoint_dirs: list[str | Path], base_model: str | Path | None = None,
                        base: str = "dequantized") -> list[Row]:
    """The trajectory of one run: each `checkpoint-STEP` folder holds an adapter; rows sorted by step."""
    if not checkpoint_dirs:
        raise QdoraError("no checkpoint folders given")
    steps = {}
    for d in checkpoint_dirs:
        s = step_of(d)
        if s is None:
            raise QdoraError(f"{d}: checkpoint folders must be named checkpoint-STEP")
        if s in steps:
            raise QdoraError(f"step {s} given twice ({steps[s]} and {d})")
        steps[s] = Path(d)
    return [r for s in sorted(steps) for r in analyze_adapter(steps[s], base_model, base, step=s)]


def analyze_finetuned(finetuned: str | Path, base_model: str | Path, base: str = "original",
                      step: int | None = None) -> list[Row]:
    """Rows for every decoder-block linear of a fully fine-tuned checkpoint against its base model
    (the base as stored, `original`, or its NF4 round trip, `dequantized`)."""
    BASE.check(base)
    for what, d in (("--finetuned", finetuned), ("--base-model", base_model)):
        if d is None or not is_model_dir(d):
            raise QdoraError(f"{what} {d!r} is not a local model folder (config.json + safetensors)")
    ref, new = WeightReader(base_model), WeightReader(finetuned)
    keys = [k for k in block_linear_keys(Path(base_model)) if k in ref]
    absent = [k for k in keys if k not in new]
    if not keys or absent:
        raise QdoraError(f"{finetuned} does not match {base_model}: it lacks {absent[0] if absent else 'weights'}")
    for k in keys:
        if ref.shape(k) != new.shape(k):
            raise QdoraError(f"{finetuned} does not match {base_model}: {k} has shape {new.shape(k)} "
                             f"there, {ref.shape(k)} in the base")
    rows = []
    for key in sorted(keys, key=_where):
        w = ref.get(key).float()
        if base == "dequantized":
            w = nf4_from_weight(w).dequantize(torch.float32)
        rows.append(_row(step, key, w, new.get(key)))
        del w
    return rows


def write_csv(rows: list[Row], path: Path) -> None:
    """Columns: step, layer, module, delta_m, delta_d (step empty for a single unnamed checkpoint)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "layer", "module", "delta_m", "delta_d"])
            writer.writeheader()
            for r in rows:
                writer.writerow({**asdict(r), "step": "" if r.step is None else r.step})

    atomic_write(path, write)


def run_analysis(
    output: str | Path, adapter: str | Path | None = None, finetuned: str | Path | None = None,
    checkpoints: list[str | Path] | None = None, base_model: str | Path | None = None, base: str | None = None,
) -> tuple[list[Row], list[ModuleSummary]]:
    """What `qdora analyze` does: one source (adapter, fine-tuned model, or checkpoints), CSV + PNG."""
    if base is not None:
        BASE.check(base)
    given = [n for n, v in (("--adapter", adapter), ("--finetuned", finetuned), ("--checkpoints", checkpoints))
             if v]
    if len(given) != 1:
        raise QdoraError("give exactly one of --adapter, --finetuned, --checkpoints"
                         + (f" (got {', '.join(given)})" if given else ""))
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise QdoraError(f"output {out} exists and is not a folder")
    check_writable(out, "the analysis (CSV and plot)")
    if adapter:
        rows = analyze_adapter(adapter, base_model, base or "dequantized")
    elif finetuned:
        if base_model is None:
            raise QdoraError("--finetuned needs --base-model (the model it was fine-tuned from)")
        rows = analyze_finetuned(finetuned, base_model, base or "original")
    else:
        rows = analyze_checkpoints(list(checkpoints), base_model, base or "dequantized")
    summary = summarize(rows)
    with writing(out, "the analysis (CSV and plot)"):
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / CSV_NAME)
        plot_rows(rows, summary, out / PNG_NAME)
    return rows, summary
