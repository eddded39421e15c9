"""Measure the two constants the planner assumes for a CUDA card: context size and fragmentation.

context: device memory in use (nvidia's count: total - free) that the caching allocator does not hold,
after CUDA, cuBLAS and a bf16 matmul are initialised (the planner's CUDA_CONTEXT_GIB).
fragmentation: max reserved / max allocated - 1 over a few training steps of one method at one shape
(the planner's FRAGMENTATION), with the allocator's defaults.

    python -m benchmarks.gpu.cuda_constants --shape 8b --seq-len 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--method", default="qdora-dora")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    from benchmarks.bench_model import build
    from benchmarks.train_step import batch, train_step
    from qdora.tools.plan import CUDA_CONTEXT_GIB, FRAGMENTATION, GIB
    from qdora.tools.presets import preset_config

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    dev = torch.device("cuda")
    a = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
    (a @ a).sum().item()
    free, total = torch.cuda.mem_get_info(dev)
    context = total - free - torch.cuda.memory_reserved(dev)
    del a
    torch.cuda.empty_cache()
    config = preset_config(args.shape)
    model = build(config, args.method, 16, 16.0, dev, torch.bfloat16)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = batch(config, 1, args.seq_len, dev, 0)
    torch.cuda.reset_peak_memory_stats(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    for _ in range(args.steps):
        train_step(model, opt, ids, amp)
    torch.cuda.synchronize(dev)
    alloc, reserved = torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)
    free2, _ = torch.cuda.mem_get_info(dev)
    rep = dict(shape=args.shape, seq_len=args.seq_len, method=args.method, gpu=torch.cuda.get_device_name(dev),
               context_gib=context / GIB, planner_context_gib=CUDA_CONTEXT_GIB,
               max_allocated_gib=alloc / GIB, max_reserved_gib=reserved / GIB,
               fragmentation=reserved / alloc - 1, planner_fragmentation=FRAGMENTATION,
               device_used_gib=(total - free2) / GIB)
    print(json.dumps(rep))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
