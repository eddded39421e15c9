"""The phases in the order they should run (the most telling first, for a slice of GPU time cut short)."""

from __future__ import annotations

PHASES = ("setup", "storage", "tests", "speed", "profile", "memory", "70b-1gpu", "70b-2ranks")


def run_phase(name: str, out, dry_run: bool):
    """Run one phase; returns its Phase (rows, ok)."""
    from benchmarks.gpu.common import Phase

    phase = Phase(name, out, dry_run)
    if name == "setup":
        from benchmarks.gpu.setup_phase import run
    elif name == "storage":
        from benchmarks.gpu.storage_phase import run
    elif name == "tests":
        from benchmarks.gpu.tests_phase import run
    elif name == "speed":
        from benchmarks.gpu.speed_phase import run
    elif name == "profile":
        from benchmarks.gpu.profile_phase import run
    elif name == "memory":
        from benchmarks.gpu.memory_phase import run
    elif name in ("70b-1gpu", "70b-2ranks"):
        from benchmarks.gpu.big_phase import run
    else:
        raise ValueError(f"unknown phase {name!r}: choose from {', '.join(PHASES)}")
    try:
        run(phase)
    except Exception as e:  # a phase that breaks still writes its JSON: the log says where
        import traceback

        phase.log(traceback.format_exc())
        phase.row("phase ran to the end", False, None, f"{type(e).__name__}: {e}")
    phase.finish()
    return phase
