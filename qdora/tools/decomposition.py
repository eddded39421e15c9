"""The numbers of the DoRA paper's weight-decomposition analysis (Liu et al. 2024, §3), apart from where the
weights come from (`analyze`) and how they are drawn (`analyze_plot`).

For a base weight W and a fine-tuned W' (rows = output features):

    ΔM = mean_i | ||W'_i|| − ||W_i|| |          ΔD = mean_i (1 − cos(W'_i, W_i))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qdora.errors import QdoraError


@dataclass(frozen=True)
class Row:
    """One weight's change; `step` is the training step (None for a single, unnamed checkpoint)."""

    step: int | None
    layer: int
    module: str
    delta_m: float
    delta_d: float


@dataclass(frozen=True)
class ModuleSummary:
    module: str
    n: int
    mean_delta_m: float
    mean_delta_d: float
    pearson_r: float  # of ΔD vs ΔM over every point of the module type (nan if undefined)


@torch.no_grad()
def decomposition_change(w: torch.Tensor, w_new: torch.Tensor) -> tuple[float, float]:
    """(ΔM, ΔD) of `w_new` against `w`, row-wise, in fp64."""
    if w.shape != w_new.shape:
        raise QdoraError(f"weights of shapes {tuple(w.shape)} and {tuple(w_new.shape)} cannot be compared")
    a, b = w.double(), w_new.double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (na * nb).clamp_min(1e-300)
    return (nb - na).abs().mean().item(), (1.0 - cos.clamp(-1.0, 1.0)).mean().item()


def summarize(rows: list[Row]) -> list[ModuleSummary]:
    """Per module type: means and the Pearson correlation of ΔD with ΔM over all its points."""
    out = []
    for module in sorted({r.module for r in rows}):
        pts = [(r.delta_d, r.delta_m) for r in rows if r.module == module]
        d = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        m = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        dc, mc = d - d.mean(), m - m.mean()
        denom = (dc.norm() * mc.norm()).item()
        r = (dc * mc).sum().item() / denom if denom > 0 else math.nan
        out.append(ModuleSummary(module, len(pts), m.mean().item(), d.mean().item(), r))
    return out


def format_table(summary: list[ModuleSummary]) -> str:
    lines = [f"{'module':<12} {'n':>4} {'mean ΔM':>11} {'mean ΔD':>11} {'r(ΔD,ΔM)':>10}  slope"]
    for s in summary:
        sign = "n/a" if math.isnan(s.pearson_r) else ("+" if s.pearson_r > 0 else "-")
        lines.append(f"{s.module:<12} {s.n:>4} {s.mean_delta_m:>11.4g} {s.mean_delta_d:>11.4g} "
                     f"{s.pearson_r:>10.3f}  {sign}")
    return "\n".join(lines)
