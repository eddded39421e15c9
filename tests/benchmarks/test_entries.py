"""Every benchmark runs as `python -m benchmarks.NAME`, answers --help, and benchmarks/README.md lists it."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def entry_points() -> list[str]:
    """Modules with a `__main__` guard, and packages with a `__main__.py`."""
    names = [p.stem for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
    names += [p.parent.name for p in BENCH.glob("*/__main__.py")]
    return sorted(names)


def test_readme_lists_exactly_the_entry_points():
    listed = set(re.findall(r"`python -m benchmarks\.([a-z_]+)`", (BENCH / "README.md").read_text()))
    assert listed == set(entry_points()) and len(listed) >= 6


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import")  # runpy re-running an imported module
@pytest.mark.parametrize("name", entry_points())
def test_help(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"benchmarks.{name}", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
