"""The one place the benchmark calls `qdora analyze` (ΔM vs ΔD plots), so the API can be swapped in.

The analysis module is written on another branch; until it lands this returns None and the report says
the plots are missing. The call shape expected: an analysis of an adapter (or of a full fine-tune via
its `finetuned` path) against the base model directory, written as a scatter plot.
"""

from __future__ import annotations

from pathlib import Path


def analysis_available() -> bool:
    try:
        import qdora.analyze  # noqa: F401
    except ImportError:
        return False
    return True


def magnitude_direction_plot(base_dir: Path, out_png: Path, title: str, adapter_dir: Path | None = None,
                             finetuned_dir: Path | None = None) -> Path | None:
    """ΔM vs ΔD scatter for an adapter or a full fine-tune; None when qdora.analyze is not available."""
    if not analysis_available():
        return None
    from qdora import analyze

    if adapter_dir is not None:
        rows = analyze.analyze_adapter(adapter_dir, base_dir)
    else:
        rows = analyze.analyze_finetuned(finetuned_dir, base_dir)
    analyze.plot_rows(rows, out_png, title=title)
    return out_png
