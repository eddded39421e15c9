"""profile: where one qdora dora step's time goes at 8B (kernels by self CUDA time), and PEFT QDoRA's beside it.

Also counts kernel launches per decoder layer per step: a careful read predicts ~630 for qdora's DoRA path
against ~335 for PEFT QLoRA, i.e. dispatch-bound on a GPU; this measures it.
"""

from __future__ import annotations

import json
import sys

from benchmarks.gpu.common import Phase


def run(phase: Phase) -> None:
    shape, seq = ("tiny", 64) if phase.dry_run else ("8b", 2048)
    rows = []
    for method in ("qdora-dora", "peft-qdora", "peft-qlora"):
        out = phase.out / f"profile-{method}.json"
        proc = phase.sh([sys.executable, "-m", "benchmarks.profile_step", "--method", method, "--shape", shape,
                         "--seq-len", str(seq), "--steps", "2", "--warmup", "1", "--device", phase.device,
                         "--top", "30", "--json", str(out)], timeout=170, check=f"profile {method} {shape}")
        if not out.is_file():
            continue
        rep = json.loads(out.read_text())
        out.unlink()  # folded into profile.json
        phase.data[method] = rep
        rows.append(f"| {method} | {rep['kernels_per_step']:.0f} | {rep['kernels_per_layer_step']:.0f} |")
        if method == "qdora-dora":
            phase.markdown.append(f"qdora-dora {shape} seq {seq}, top ops by {rep['sort_key']} (µs per step):\n\n"
                                  "| op | calls | µs/step |\n|---|---|---|\n" + "\n".join(
                                      f"| {t['name'][:60]} | {t['calls']} | {t['self_us_per_step']:.0f} |"
                                      for t in rep["top"][:20]))
        del proc
    unit = "CPU ops" if phase.dry_run else "CUDA kernels"
    phase.markdown.insert(0, f"| method | {unit} per step | per decoder layer |\n|---|---|---|\n" + "\n".join(rows))
