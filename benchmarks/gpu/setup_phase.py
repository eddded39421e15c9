"""setup: install the wheels carried in .whl/ (no network there), then report versions, GPU and free memory.

The wheels are fetched beforehand on a machine with network by scripts/gpu_wheels.sh (bitsandbytes,
gguf, datasets and what they need that the GPU image lacks). They go into a --target folder (SITE), not
the image's environment, so nothing there (its torch above all) is replaced; every later subprocess has
SITE on its PYTHONPATH.
"""

from __future__ import annotations

import json
import re
import sys

from benchmarks.gpu.common import SITE, WHEELS, Phase

# A wheel the GPU machine can install: pure Python, or CPython 3.12 on x86-64 Linux (manylinux).
_OK_TAG = re.compile(r"-(py3|py312|cp312)-(none|cp312|abi3)-(any|manylinux[\w.]*x86_64)\.whl$")


def run(phase: Phase) -> None:
    wheels = sorted(WHEELS.glob("*.whl"))
    bad = [w.name for w in wheels if not _OK_TAG.search(w.name)]
    phase.row("carried wheels are for CPython 3.12 / x86-64", not bad, None,
              f"{len(wheels)} in .whl/" + (f"; wrong tags: {', '.join(bad)}" if bad else ""))
    names = [w.name.split("-")[0].lower() for w in wheels]
    dupes = sorted({n for n in names if names.count(n) > 1})
    phase.row("one version of each wheel", not dupes, None, ", ".join(dupes))
    if phase.dry_run:
        phase.log(f"dry run: would install {len(wheels)} wheels into {SITE}")
    elif wheels:
        phase.sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], timeout=120,
                 check="pip install --no-index (offline) into " + str(SITE))
    else:
        phase.row("wheels present", False, None, "no .whl/ folder: run scripts/gpu_wheels.sh before the GPU slice")
    proc = phase.sh([sys.executable, "-m", "benchmarks.gpu.probe"], timeout=120, check="probe runs")
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return
    phase.data["environment"] = info
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf", "datasets"):
        phase.row(f"import {name}", not str(info.get(name, "MISSING")).startswith("MISSING"), None,
                  str(info.get(name)))
    if not phase.dry_run:
        phase.row("CUDA available", info.get("cuda_available", False), None,
                  f"{info.get('gpu')} ×{info.get('gpu_count')}, CUDA {info.get('torch_cuda')}, "
                  f"{info.get('free_gib', 0):.1f} of {info.get('total_gib', 0):.1f} GiB free")
    phase.row("bitsandbytes NF4 on the device", info.get("bnb_nf4_roundtrip_ok", False), None,
              f"rel. error {info.get('bnb_nf4_rel_error', float('nan')):.4f}, bytes equal to CPU's: "
              f"{info.get('bnb_nf4_bytes_equal_cpu')}" + (f"; {info['bnb_error']}" if "bnb_error" in info else ""))
    keys = ["python", "torch", "torch_cuda", "transformers", "peft", "accelerate", "bitsandbytes", "gguf",
            "datasets", "gpu", "capability", "free_gib", "total_gib"]
    phase.markdown.append("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| "
                          + " | ".join(_fmt(info.get(k)) for k in keys) + " |")


def _fmt(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)
