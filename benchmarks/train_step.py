"""Time training steps of qdora dora/lora against PEFT QDoRA/QLoRA on the same random NF4 base.

Each method gets a fresh model (built layer by layer, see bench_model.py), the same seeded token batch,
AdamW over its adapter parameters, bf16 autocast (unless --dtype float32) and non-reentrant gradient
checkpointing, with transformers' own loss (`labels=`: full logits) or `--loss chunked` (qdora/train/loss.py).
Reported per method: median step
time over --steps after --warmup, tokens/s, peak memory, MFU and the step-0 loss.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over all steps (reset after the model is built);
on CPU the peak live tensor bytes of one extra step run under `LiveBytes` (benchmarks/live_bytes.py),
after warmup so the optimizer states exist. MFU = model flops / (median step time × the bf16 matmul rate
measured in the same run), model flops = 6·N·T + 12·L·S·H·T  (N = non-embedding parameters incl. lm_head,
T = tokens per step, L layers, S sequence length, H hidden size: PaLM's formula, attention counted
non-causally; recompute under checkpointing is not counted, as usual for MFU).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.bench_model import METHODS, build
from benchmarks.live_bytes import LiveBytes, storage_bytes
from qdora.errors import QdoraError
from qdora.tools.presets import preset_config

GIB = 1024**3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """Measured dense `torch.mm` rate in flop/s (bf16 unless --dtype float32): the MFU denominator."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def model_flops(config, tokens: int, seq_len: int) -> float:
    """6·N·T + 12·L·S·H·T with N the non-embedding parameter count (lm_head included)."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * (2 * h + 2 * kv) + 3 * h * i
    n = L * per_layer + config.vocab_size * h
    return 6.0 * n * tokens + 12.0 * L * seq_len * h * tokens


def batch(config, micro_batch: int, seq_len: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=gen).to(device)


def _state_tensors(model, opt) -> list[torch.Tensor]:
    """Everything alive before a step: parameters, buffers, optimizer states, and the statistics bnb keeps
    as attributes of its Params4bit (absmax, code, nested state) that are neither parameters nor buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            tensors += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    for state in opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def forward_loss(model, ids: torch.Tensor, loss: str = "full", chunk: int = 1024) -> torch.Tensor:
    """transformers' own loss from `labels=` (full logits), or qdora's chunked loss on the final hidden
    states (never more than `chunk` tokens of logits at once)."""
    if loss == "full":
        return model(input_ids=ids, labels=ids).loss
    from qdora.train.loss import chunked_causal_lm_loss

    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    return chunked_causal_lm_loss(hidden, model.get_output_embeddings().weight, ids, chunk)


def train_step(model, opt, ids: torch.Tensor, amp, loss_kind: str = "full", chunk: int = 1024) -> torch.Tensor:
    """One optimizer step: forward with labels, backward, AdamW, zero grads."""
    with amp:
        loss = forward_loss(model, ids, loss_kind, chunk)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def autocast_for(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def run_method(method: str, args, config, device: torch.device, dtype: torch.dtype, ids: torch.Tensor) -> dict:
    """Build, warm up and time one method; frees everything it built before returning."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = build(config, method, args.rank, args.alpha, device, dtype, seed=args.seed)
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    amp = autocast_for(device, dtype)
    if device.type == "cuda":
        sync(device)
        model_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        model_bytes = storage_bytes(list(model.parameters()) + list(model.buffers()))[0]

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        loss = train_step(model, opt, ids, amp, args.loss, args.loss_chunk)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    if device.type == "cuda":
        peak, peak_how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        with LiveBytes(_state_tensors(model, opt)) as live:
            train_step(model, opt, ids, amp, args.loss, args.loss_chunk)
        peak, peak_how = live.peak, "LiveBytes (dispatcher live tensors)"
    med = statistics.median(times)
    tokens = ids.numel()
    result = dict(
        method=method, median_step_s=med, step_times_s=times, tokens_per_s=tokens / med,
        peak_bytes=peak, peak_gib=peak / GIB, peak_measured_by=peak_how, model_bytes=model_bytes,
        trainable_params=sum(p.numel() for p in params), losses=losses, loss_step0=losses[0],
        build_s=build_s,
    )
    del model, opt, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                bitsandbytes=bitsandbytes.__version__, python=platform.python_version())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", help="tiny, small, 1b, 8b, 70b, 70b-4layers (any NAME-Klayers)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--loss", default="full", choices=["full", "chunked"],
                   help="full: transformers' loss from labels=; chunked: qdora/train/loss.py on the hidden states")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per logits chunk with --loss chunked")
    p.add_argument("--mem-cap-gib", type=float, help="CUDA: cap this process's GPU memory (emulates a smaller card)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="write machine-readable results here")
    p.add_argument("--markdown", action="store_true", help="print a RESULTS.md-ready table")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS]
    if bad or not args.method_list:
        raise QdoraError(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
    if min(args.seq_len, args.micro_batch, args.rank, args.steps) < 1 or args.warmup < 0:
        raise QdoraError("--seq-len, --micro-batch, --rank and --steps must be >= 1, --warmup >= 0")
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    config = preset_config(args.shape)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.mem_cap_gib:
        if device.type != "cuda":
            raise QdoraError("--mem-cap-gib needs a CUDA device")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * GIB / total), device)
    ids = batch(config, args.micro_batch, args.seq_len, device, args.seed)
    rate = matmul_rate(device, dtype)
    flops = model_flops(config, ids.numel(), args.seq_len)
    results = []
    for method in args.method_list:
        r = None
        try:
            r = run_method(method, args, config, device, dtype, ids)
        except torch.OutOfMemoryError as e:  # a capped 70B run may not fit: record it, go on with the next
            oom = f"out of memory: {str(e).splitlines()[0]}"
        if r is None:  # outside the except: the traceback (and the model it holds) is gone before freeing
            gc.collect()
            torch.cuda.empty_cache()
            results.append(dict(method=method, error=oom))
            print(f"{method:11s} {oom}", file=sys.stderr)
            continue
        r["mfu"] = flops / r["median_step_s"] / rate
        results.append(r)
        print(f"{method:11s} {r['median_step_s']:.4f} s/step  {r['tokens_per_s']:.1f} tok/s  "
              f"peak {r['peak_gib']:.3f} GiB  MFU {100 * r['mfu']:.2f}%  loss0 {r['loss_step0']:.5f}",
              file=sys.stderr)
    report = dict(
        command="python -m benchmarks.train_step " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        device=device_name(device), versions=versions(), shape=args.shape, seq_len=args.seq_len,
        micro_batch=args.micro_batch, rank=args.rank, mem_cap_gib=args.mem_cap_gib,
        alpha=args.alpha, steps=args.steps, warmup=args.warmup,
        dtype=args.dtype, loss=args.loss, loss_chunk=args.loss_chunk,
        matmul_flops_per_s=rate, model_flops_per_step=flops, results=results,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    if args.markdown:
        print(markdown(report))
    return report


def markdown(rep: dict) -> str:
    """A table plus the exact command, device and versions, ready to paste into RESULTS.md."""
    v = rep["versions"]
    by = {r["method"]: r for r in rep["results"]}
    ref = by.get("peft-qlora")
    ref = ref if ref and "error" not in ref else None
    lines = [
        f"`{rep['command']}`  ",
        f"device: {rep['device']}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"bitsandbytes {v['bitsandbytes']}; {rep['date']}  ",
        f"shape {rep['shape']}, seq {rep['seq_len']}, micro-batch {rep['micro_batch']}, r={rep['rank']}, "
        f"{rep['dtype']}, loss {rep['loss']}, median of {rep['steps']} steps after {rep['warmup']} warmup; "
        f"measured mm rate {rep['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s",
        "",
        "| method | s/step | tok/s | peak GiB | MFU | loss step 0 | tok/s vs PEFT QLoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rep["results"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} | | | | | |")
            continue
        rel = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        lines.append(f"| {r['method']} | {r['median_step_s']:.4f} | {r['tokens_per_s']:.1f} | {r['peak_gib']:.4f} | "
                     f"{100 * r['mfu']:.2f}% | {r['loss_step0']:.5f} | {rel} |")
    how = {r["peak_measured_by"] for r in rep["results"] if "peak_measured_by" in r}
    lines.append(f"\npeak measured by: {', '.join(sorted(how))}")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        run(argv)
    except QdoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
