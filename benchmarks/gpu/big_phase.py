"""70b-1gpu / 70b-2ranks: a 70B-shaped model (random weights, made tensor by tensor) trains a few steps
under a 24 GiB cap per rank: one process with `--offload params` (the NF4 base streamed from pinned host
memory), and two FSDP2 ranks sharing the GPU with the base resident (gloo: NCCL refuses two ranks on one
GPU). The dry run does the same at the tiny shape on the CPU (no cap, no offload there).
"""

from __future__ import annotations

import json
import sys

from benchmarks.gpu.common import Phase


def fitting_flags(phase: Phase) -> list[str]:
    """The planner's cheapest base-resident fit for 70B on 2 × 24 GiB, limited to flags `qdora train` has."""
    from benchmarks.gpu.big_train import train_flags
    from qdora.tools.plan import plan_memory
    from qdora.tools.presets import preset_config

    plan = plan_memory(preset_config("70b"), gpus=2, gpu_mem_gib=24, seq_len=2048)
    phase.log(plan.report())
    sug = getattr(plan, "suggestion", None) or {}
    if plan.fits or not sug.get("flags"):
        return []
    flags, help_text, out = sug["flags"].split(), train_flags(), []
    for i in range(0, len(flags) - 1, 2):
        if flags[i] in help_text:
            out += flags[i:i + 2]
        else:
            phase.log(f"planner suggests {flags[i]} {flags[i + 1]}, which qdora train does not have yet")
    phase.data["planner_flags"] = sug["flags"]
    phase.data["flags_used"] = " ".join(out)
    return out


def run(phase: Phase) -> None:
    two = phase.name == "70b-2ranks"
    shape, seq, steps = ("tiny", 128, 2) if phase.dry_run else ("70b", 2048, 3)
    out = phase.out / "big.json"
    args = ["--shape", shape, "--seq-len", str(seq), "--steps", str(steps), "--json", str(out)]
    env = {}
    if not phase.dry_run:
        args += ["--mem-cap-gib", "24", "--device", "cuda:0"]
        if not two:
            args += ["--offload", "params"]
    else:
        args += ["--device", "cpu"]
    if two and not phase.dry_run:
        args += fitting_flags(phase)
    if two:
        from qdora.train.distributed import free_port

        env["QDORA_DIST_BACKEND"] = "gloo"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "benchmarks.gpu.big_train", *args]
    else:
        cmd = [sys.executable, "-m", "benchmarks.gpu.big_train", *args]
    if phase.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    phase.sh(cmd, timeout=500, check=f"{shape} trains {steps} steps" + (" on 2 ranks" if two else ""), env=env)
    reports = []
    for path in sorted(phase.out.glob("big.json*")):
        reports.append(json.loads(path.read_text()))
        path.unlink()
    phase.data["ranks"] = reports
    lines = ["| rank | steps | tok/s (rank 0, median) | peak allocated GiB | peak reserved GiB | planner GiB |",
             "|---|---|---|---|---|---|"]
    for r in reports:
        nan = float("nan")
        peak = r.get("max_allocated_gib", r.get("peak_allocated_gib_rank0", nan))
        lines.append(f"| {r['rank']} | {len(r['losses'])} | {r.get('tokens_per_s_rank0', nan):.1f} | {peak:.2f} | "
                     f"{r.get('max_reserved_gib', nan):.2f} | {r.get('planner_allocated_gib', nan):.2f} |")
        if "max_allocated_gib" in r and "planner_allocated_gib" in r:
            err = r["planner_allocated_gib"] / r["max_allocated_gib"] - 1
            phase.row(f"rank {r['rank']}: planner within 10% of measured peak", abs(err) <= 0.10, None,
                      f"{100 * err:+.1f}%")
    phase.row("every rank reported", len(reports) == (2 if two else 1), None, f"{len(reports)} report(s)")
    phase.markdown.append("\n".join(lines))
