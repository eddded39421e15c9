"""`qdora train` on a random-weight model of a preset shape (70B by default), under a GPU memory cap.

    python -m benchmarks.gpu.big_train --shape 70b --offload params --mem-cap-gib 24 --steps 3 --json r.json
    QDORA_DIST_BACKEND=gloo torchrun --nproc_per_node 2 -m benchmarks.gpu.big_train --device cuda:0 ...

The second form runs two FSDP2 ranks sharing one GPU (NCCL refuses that; gloo carries CUDA tensors),
each capped like a 24 GiB card. Reports tokens/s (median over steps after the first), the peak allocated
and reserved memory per rank, and the planner's prediction for the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

GIB = 1024**3


# The planner's memory modes and what `qdora train` did before it had the flag (the run's actual layout).
PLAN_MODES = {"embeddings": "device", "lm_head": "dense", "adapter_dtype": "fp32", "optim": "adamw"}


def train_flags() -> str:
    """`qdora train --help`: which memory-mode flags this checkout's CLI has."""
    from click.testing import CliRunner

    from qdora.cli import main as cli

    return CliRunner().invoke(cli, ["train", "--help"]).output


def plan_settings(extra: list[str]) -> dict[str, str]:
    """The planner's memory modes for a run given `extra` train flags: a flag's value when given, the
    train default when the CLI has the flag, else the layout train uses without it."""
    help_text = train_flags()
    out = {}
    for key, without in PLAN_MODES.items():
        flag = "--" + key.replace("_", "-")
        if flag in extra:
            out[key] = extra[extra.index(flag) + 1]
        elif flag not in help_text:
            out[key] = without
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="70b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--method", default="dora")
    p.add_argument("--offload", default="none", choices=["none", "activations", "params", "all"])
    p.add_argument("--mem-cap-gib", type=float, help="cap this process's GPU memory (a smaller card)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--work", help="folder for the model config, data and run (default: a temp folder)")
    p.add_argument("--json", dest="json_out")
    args, extra = p.parse_known_args(argv)  # anything else goes to qdora train (e.g. --adapter-dtype bf16)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))

    import qdora.cli  # noqa: F401  (imports every module the CLI's train uses, before patching)
    import qdora.train.loop  # noqa: F401
    from benchmarks.gpu.synthetic import use_random_weights, write_model_dir, write_text_data
    from qdora.train.distributed import pick_device

    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if args.mem_cap_gib:
        if device.type != "cuda":
            raise SystemExit("--mem-cap-gib needs a CUDA device")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * GIB / total), device)
    # one folder for all ranks (the same on each: torchrun's port), model and data per rank, one shared run
    root = Path(args.work or Path(tempfile.gettempdir()) / f"qdora-big-{os.environ.get('MASTER_PORT', os.getpid())}")
    work = root / f"rank{rank}"
    model_dir = write_model_dir(work / "model", args.shape)
    data = write_text_data(work / "data.jsonl")
    use_random_weights(device)
    from qdora.cli import main as cli

    out = root / "run"
    cmd = ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--format", "text",
           "--seq-len", str(args.seq_len), "--max-steps", str(args.steps), "--rank", str(args.rank),
           "--alpha", str(args.rank), "--method", args.method, "--dtype", args.dtype, "--device", str(device),
           "--offload", args.offload, "--log-every", "1", "--lr", "1e-4", *extra]
    try:  # the real CLI, in this process (so the random weight source is in place)
        rc = cli.main(cmd, standalone_mode=False)
    except SystemExit as e:
        rc = e.code
    print(f"qdora train exited with {rc or 0}", flush=True)
    report = dict(shape=args.shape, seq_len=args.seq_len, steps=args.steps, offload=args.offload, world=world,
                  rank=rank, mem_cap_gib=args.mem_cap_gib, device=str(device), extra=extra,
                  command=" ".join(sys.argv))
    rows = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    report["losses"] = [r["loss"] for r in steps]
    if steps:
        tps = [r["tokens_per_s"] for r in steps[1:]] or [steps[0]["tokens_per_s"]]
        report["tokens_per_s_rank0"] = statistics.median(tps)
        report["peak_allocated_gib_rank0"] = max(r["peak_mem_gb"] for r in steps)
    if device.type == "cuda":
        report["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        report["max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    try:
        from qdora.tools.plan import plan_memory
        from qdora.tools.presets import preset_config

        plan = plan_memory(preset_config(args.shape), gpus=world, seq_len=args.seq_len, rank=args.rank,
                           method=args.method, offload=args.offload, gpu_mem_gib=args.mem_cap_gib or 80,
                           **plan_settings(extra))
        report["planner_allocated_gib"] = plan.allocated_bytes / GIB
        report["planner_total_gib"] = plan.total_bytes / GIB
    except Exception as e:  # noqa: BLE001  (the planner's signature may grow options; the run is what counts)
        report["planner_error"] = f"{type(e).__name__}: {e}"
    report["exit"] = rc or 0
    # only rank 0 writes metrics; every rank must have finished the CLI cleanly
    ok = not rc and (rank != 0 or len(steps) == args.steps) and all(v == v for v in report["losses"])
    report["ok"] = ok
    print("BIG_TRAIN " + json.dumps(report), flush=True)
    if args.json_out:
        Path(f"{args.json_out}.rank{rank}" if world > 1 else args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
