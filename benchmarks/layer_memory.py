"""The planner's per-layer terms against live tensor bytes measured at a real width (70B: hidden 8192,
MLP 28672), on CPU, with a few decoder layers.

For each layer count L (default 1 and 2) a random-weight NF4 QDoRA model is built layer by layer
(benchmarks/bench_model.py) and one training step runs under `LiveBytes` (benchmarks/live_bytes.py) with
bf16 autocast, per-layer gradient checkpointing and qdora's chunked loss. The vocabulary is cut to
`--vocab` rows (the per-layer terms do not depend on it; a 128k vocabulary would only add two 2 GiB
tables). Measured per layer, against `qdora.tools.plan`:

- static: bytes of one decoder layer's parameters and buffers (NF4 bytes, statistics, row norms,
  norms, adapters) plus its AdamW states and gradients — vs the planner's NF4 shardable + replicated
  bytes, layer norms and adapter parameters × bytes per parameter (16 for fp32 AdamW);
- checkpoint: (live after forward − static) at L layers minus the same at L−1 — vs `checkpoint_per_layer`
  (one [tokens, hidden] bf16 hidden state);
- recompute: peak during the backward minus the live bytes when it starts — vs `layer_recompute_bytes`
  + the largest dequantized matrix (the last layer's recompute and backward; the loss at this vocab is
  small and runs before it).

    python -m benchmarks.layer_memory --shape 70b --layers 1,2 --seq-len 256
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_model import build  # noqa: E402
from benchmarks.live_bytes import LiveBytes, storage_bytes  # noqa: E402
from benchmarks.train_step import _state_tensors, autocast_for, forward_loss  # noqa: E402
from qdora.tools.plan import (  # noqa: E402
    GIB,
    adapter_bytes_per_param,
    adapter_param_count,
    layer_recompute_bytes,
    nf4_bytes,
    shape_from_config,
)
from qdora.tools.presets import preset_config  # noqa: E402


def measure(shape_name: str, layers: int, vocab: int, seq: int, rank: int, method: str, threads: int) -> dict:
    """One training step of an L-layer model at the preset's width: static bytes, live after forward,
    peak during backward."""
    config = preset_config(f"{shape_name}-{layers}layers")
    config.vocab_size = vocab
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(config, f"qdora-{method}", rank, float(rank), torch.device("cpu"), torch.bfloat16)
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    amp = autocast_for(torch.device("cpu"), torch.bfloat16)
    t0 = time.perf_counter()
    with LiveBytes(_state_tensors(model, opt)) as live:
        with amp:
            loss = forward_loss(model, ids, "chunked", 1024)
        after_forward, _ = live.mark()
        loss.backward()
        _, backward_peak = live.mark()
    step_s = time.perf_counter() - t0
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    states = storage_bytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
                            and v.dim() > 0])[0]
    layer0 = model.get_decoder().layers[0]
    layer_bytes = storage_bytes(list(layer0.parameters()) + list(layer0.buffers()))[0]
    model_bytes = storage_bytes(list(model.parameters()) + list(model.buffers()))[0]
    out = dict(layers=layers, static_model=model_bytes, grads=grads, optimizer_states=states,
               layer0_param_buffer_bytes=layer_bytes, after_forward=after_forward, backward_peak=backward_peak,
               loss=float(loss), build_s=build_s, step_s=step_s)
    del model, opt, loss
    gc.collect()
    return out


def planned(shape_name: str, seq: int, rank: int, method: str) -> dict:
    shape = shape_from_config(preset_config(shape_name))
    shardable = replicated = 0
    for o, i in shape.linears().values():
        sh, rep = nf4_bytes(o, i)
        shardable, replicated = shardable + sh, replicated + rep
    per_layer_adapters = adapter_param_count(shape, rank, method, shape.linear_paths()) // shape.layers
    largest = max(o * i for o, i in shape.linears().values())
    return dict(
        layer_storage=shardable + replicated + 2 * shape.hidden * 2 + per_layer_adapters * 4,
        layer_static=shardable + replicated + 2 * shape.hidden * 2
        + per_layer_adapters * adapter_bytes_per_param("fp32", "adamw"),
        checkpoint=seq * shape.hidden * 2,
        recompute=layer_recompute_bytes(shape, seq, method) + largest * 2,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="70b")
    p.add_argument("--layers", default="1,2", help="two or more layer counts, ascending")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--method", default="dora", choices=["dora", "lora"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = [int(x) for x in args.layers.split(",")]
    if len(counts) < 2 or counts != sorted(set(counts)):
        p.error("--layers needs two or more ascending layer counts")
    runs = [measure(args.shape, n, args.vocab, args.seq_len, args.rank, args.method, args.threads) for n in counts]
    plan = planned(args.shape, args.seq_len, args.rank, args.method)
    a, b = runs[0], runs[-1]
    dl = b["layers"] - a["layers"]
    static = lambda r: r["static_model"] + r["grads"] + r["optimizer_states"]  # noqa: E731
    measured = dict(
        layer_storage=a["layer0_param_buffer_bytes"],
        layer_static=(static(b) - static(a)) / dl,
        checkpoint=((b["after_forward"] - b["static_model"]) - (a["after_forward"] - a["static_model"])) / dl,
        recompute=b["backward_peak"] - b["after_forward"],
    )
    rows, worst = [], 0.0
    print(f"{args.shape} width, layers {args.layers}, seq {args.seq_len}, vocab {args.vocab}, r={args.rank} "
          f"{args.method}, bf16 autocast, CPU ({args.threads} threads)\n")
    print("| per-layer term | planned MiB | measured MiB | error |\n|---|---|---|---|")
    for k in ("layer_storage", "layer_static", "checkpoint", "recompute"):
        err = plan[k] / measured[k] - 1
        worst = max(worst, abs(err))
        rows.append(dict(term=k, planned=plan[k], measured=measured[k], error=err))
        print(f"| {k} | {plan[k] / 2**20:.1f} | {measured[k] / 2**20:.1f} | {100 * err:+.1f}% |")
    steps = ", ".join(f"{r['step_s']:.0f}" for r in runs)
    builds = ", ".join(f"{r['build_s']:.0f}" for r in runs)
    peaks = ", ".join(f"{r['backward_peak'] / GIB:.2f}" for r in runs)
    print(f"\nworst |error| {100 * worst:.1f}%; step {steps} s, build {builds} s; step peaks {peaks} GiB live")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(args=vars(args), runs=runs, planned=plan,
                                                       measured=measured, rows=rows), indent=2))
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
