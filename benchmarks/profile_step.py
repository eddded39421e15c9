"""Where a training step's time goes: torch.profiler over a few steps of one method, top ops by self time.

Uses the same model, batch and step as train_step.py, so its tables explain that harness's figures.
On CUDA the table is sorted by self CUDA time (kernels), on CPU by self CPU time.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_model import METHODS, build
from benchmarks.train_step import autocast_for, batch, sync, train_step
from qdora.tools.presets import preset_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="qdora-dora", choices=METHODS)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--loss", default="full", choices=["full", "chunked"])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", help="also write a Chrome trace here")
    p.add_argument("--json", dest="json_out", help="write kernel launches per step and the top ops here")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = preset_config(args.shape)
    ids = batch(config, args.micro_batch, args.seq_len, device, 0)
    model = build(config, args.method, args.rank, float(args.rank), device, dtype)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    amp = autocast_for(device, dtype)
    for _ in range(args.warmup):
        train_step(model, opt, ids, amp, args.loss)
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            train_step(model, opt, ids, amp, args.loss)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# {args.method} {args.shape} seq {args.seq_len} mb {args.micro_batch} r {args.rank} "
          f"{args.dtype} on {device}: {args.steps} steps, per-step totals = column / {args.steps}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.json_out:
        write_json(prof, args, key, config.num_hidden_layers)
    return 0


def write_json(prof, args, key: str, layers: int) -> None:
    """Kernel launches per step (per decoder layer too) and the top ops by self time, for the GPU check."""
    import json
    from pathlib import Path

    from torch.autograd import DeviceType

    events = prof.events()
    cuda = args.device.startswith("cuda")
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA) if cuda else len(events)
    top = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[: args.top]:
        top.append(dict(name=e.key, calls=e.count, self_us_per_step=getattr(e, key) / args.steps))
    Path(args.json_out).write_text(json.dumps(dict(
        method=args.method, shape=args.shape, seq_len=args.seq_len, steps=args.steps,
        kernels_per_step=kernels / args.steps, kernels_per_layer_step=kernels / args.steps / layers,
        sort_key=key, top=top), indent=2))


if __name__ == "__main__":
    sys.exit(main())
