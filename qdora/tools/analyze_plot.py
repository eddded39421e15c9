"""Scatter plots of the weight-decomposition analysis, laid out like the DoRA paper's Figure 2:
ΔD on x, ΔM on y, one panel per module type, one colour per training step."""

from __future__ import annotations

import math
from pathlib import Path

from qdora.io.atomic import atomic_write
from qdora.tools.decomposition import ModuleSummary, Row


def plot_rows(rows: list[Row], summary: list[ModuleSummary], path: Path) -> None:
    """Write the PNG (Agg backend: no display needed); the title of each panel gives r and the slope sign."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    modules = [s.module for s in summary]
    cols = min(4, len(modules))
    nrows = math.ceil(len(modules) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    steps = sorted({r.step for r in rows}, key=lambda s: (s is not None, s or 0))
    cmap = plt.get_cmap("viridis" if len(steps) > 10 else "tab10")
    colours = {s: cmap(i / max(len(steps) - 1, 1) if len(steps) > 10 else i) for i, s in enumerate(steps)}
    for ax, s in zip(axes.flat, summary, strict=False):
        for step in steps:
            pts = [r for r in rows if r.module == s.module and r.step == step]
            if pts:
                ax.scatter([r.delta_d for r in pts], [r.delta_m for r in pts], s=22, color=colours[step],
                           label="final" if step is None else f"step {step}", alpha=0.85, edgecolors="none")
        xs = [r.delta_d for r in rows if r.module == s.module]
        ys = [r.delta_m for r in rows if r.module == s.module]
        if not math.isnan(s.pearson_r):  # least-squares line through all points of the panel
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            k = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
            lo, hi = min(xs), max(xs)
            ax.plot([lo, hi], [my + k * (lo - mx), my + k * (hi - mx)], "k--", lw=1, alpha=0.6)
        slope = "n/a" if math.isnan(s.pearson_r) else ("positive" if s.pearson_r > 0 else "negative")
        ax.set_title(f"{s.module}: r = {s.pearson_r:.2f} (slope {slope})", fontsize=10)
        ax.set_xlabel("ΔD (1 − cos, mean over rows)")
        ax.set_ylabel("ΔM (|Δ‖row‖|, mean over rows)")
        ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 3))
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(summary):]:
        ax.axis("off")
    height = fig.get_figheight()
    header = 0.75 if len(steps) > 1 else 0.45  # inches above the panels: title (and the step legend)
    fig.suptitle("Magnitude vs direction change per weight (DoRA §3)", y=1 - 0.08 / height, va="top")
    if len(steps) > 1:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.38 / height),
                   ncol=min(len(steps), 8), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - header / height))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
