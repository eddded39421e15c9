"""The one place the benchmark calls `qdora analyze` (ΔM vs ΔD), so the API can be swapped in.

`qdora.tools.analyze.run_analysis(output, adapter=… | finetuned=…, base_model=…)` writes a CSV (one row per
layer and module: delta_m, delta_d) and a per-module PNG into `output`, and returns the rows and a
per-module summary with the Pearson correlation of ΔD and ΔM (the sign of the slope the DoRA paper reads
off its Figure 2). Until that module is on this branch, `analyze_weights` returns None and the report
says the plots are missing. `side_by_side` only lays the CSVs of all methods out in one small figure.
"""

from __future__ import annotations

import csv
from pathlib import Path


def analyze_weights(base_dir: Path, work_dir: Path, adapter_dir: Path | None = None,
                    finetuned_dir: Path | None = None) -> tuple[Path, dict[str, float]]:
    """Run `qdora analyze` on an adapter or a full fine-tune: (CSV path, {module: r(ΔD, ΔM)})."""
    from qdora.tools import analyze

    _, summary = analyze.run_analysis(work_dir, adapter=adapter_dir, finetuned=finetuned_dir, base_model=base_dir)
    return work_dir / analyze.CSV_NAME, {s.module: s.pearson_r for s in summary}


def side_by_side(csvs: dict[str, Path], out_png: Path) -> Path:
    """One panel per method, every (layer, module) point of its CSV coloured by module: a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(csvs), figsize=(3.3 * len(csvs), 3.0), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, path) in zip(axes[0], csvs.items(), strict=True):
        rows = list(csv.DictReader(path.open()))
        modules = sorted({r["module"] for r in rows})
        for i, module in enumerate(modules):
            pts = [r for r in rows if r["module"] == module]
            ax.scatter([float(r["delta_d"]) for r in pts], [float(r["delta_m"]) for r in pts], s=14,
                       color=cmap(i), label=module)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("ΔD", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ΔM", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
