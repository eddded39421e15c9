"""`qdora plan` against measurement: plan and run the harness for the same configurations, print
predicted vs measured peak with the % error (goal: within 10% on every GPU configuration).

The harness is single-rank, so the planner is asked for gpus=1, offload none and the harness' loss; the
comparison is of allocated bytes (`max_memory_allocated` on CUDA, live
tensor bytes on CPU), not of the card total (context and fragmentation are not in either measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.train_step import run
from qdora.tools.plan import GIB, plan_memory
from qdora.tools.presets import preset_config

CPU_CONFIGS = ["tiny:128", "tiny:512", "small:256"]
GPU_CONFIGS = ["1b:4096", "8b:2048", "8b:4096", "70b-4layers:2048"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--configs", help="comma list of SHAPE:SEQ (default: CPU or GPU set)")
    p.add_argument("--methods", default="qdora-dora,qdora-lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--loss", default="full", choices=["full", "chunked"])
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configs = args.configs.split(",") if args.configs else (GPU_CONFIGS if device == "cuda" else CPU_CONFIGS)
    rows, worst = [], 0.0
    print("| shape | seq | method | predicted GiB | measured GiB | error |\n|---|---|---|---|---|---|")
    for item in configs:
        shape, seq = item.split(":")
        rep = run(["--shape", shape, "--seq-len", seq, "--rank", str(args.rank), "--steps", str(args.steps),
                   "--warmup", "1", "--device", device, "--methods", args.methods, "--loss", args.loss])
        for r in rep["results"]:
            method = r["method"].split("-", 1)[1]
            plan = plan_memory(preset_config(shape), gpus=1, seq_len=int(seq), rank=args.rank, method=method,
                               loss=args.loss, embeddings="device")  # the harness keeps it on the device
            err = plan.allocated_bytes / r["peak_bytes"] - 1
            worst = max(worst, abs(err))
            rows.append(dict(shape=shape, seq=int(seq), method=r["method"], predicted=plan.allocated_bytes,
                             measured=r["peak_bytes"], error=err, device=rep["device"]))
            print(f"| {shape} | {seq} | {r['method']} | {plan.allocated_bytes / GIB:.4f} | "
                  f"{r['peak_bytes'] / GIB:.4f} | {100 * err:+.1f}% |", flush=True)
    print(f"\nworst |error| {100 * worst:.1f}% on {rows[0]['device'] if rows else device}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
