"""memory: the planner against measurement (plan_check.py), and the CUDA constants it assumes.

plan_check runs the harness at 1B/4096, 8B/2048, 8B/4096 and 70B-widths/4 layers and compares
`qdora plan`'s allocated bytes with `max_memory_allocated` (goal: within 10%); cuda_constants measures the
context size and fragmentation the planner adds on top (both assumptions until this phase has run).
"""

from __future__ import annotations

import json
import sys

from benchmarks.gpu.common import Phase


def run(phase: Phase) -> None:
    out = phase.out / "plan_check.json"
    cmd = [sys.executable, "-m", "benchmarks.plan_check", "--device", phase.device, "--json", str(out)]
    if phase.dry_run:
        cmd += ["--configs", "tiny:128", "--steps", "1"]
    proc = phase.sh(cmd, timeout=360, check="plan_check: planner within 10% of every measured peak")
    if out.is_file():
        phase.data["plan_check"] = json.loads(out.read_text())
        out.unlink()
        table = proc.stdout[proc.stdout.find("| shape"):].strip()
        phase.markdown.append(table)
    if phase.dry_run:
        phase.log("dry run: CUDA constants need a CUDA device")
        return
    out = phase.out / "cuda_constants.json"
    phase.sh([sys.executable, "-m", "benchmarks.gpu.cuda_constants", "--shape", "8b", "--seq-len", "2048",
              "--json", str(out)], timeout=150, check="CUDA context and fragmentation measured")
    if out.is_file():
        c = json.loads(out.read_text())
        out.unlink()
        phase.data["cuda_constants"] = c
        phase.markdown.append(
            "| constant | planner assumes | measured |\n|---|---|---|\n"
            f"| CUDA context (GiB) | {c['planner_context_gib']} | {c['context_gib']:.3f} |\n"
            f"| fragmentation (reserved/allocated - 1) | {c['planner_fragmentation']} | {c['fragmentation']:.3f} |")
