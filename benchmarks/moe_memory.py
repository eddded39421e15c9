"""Peak host memory of loading an MoE model for QDoRA: the experts are quantized one checkpoint tensor at a
time, so a layer's experts never sit in memory in full precision (transformers' own load fuses each layer's
experts into one [E, 2I, H] bf16 tensor first).

    python -m benchmarks.moe_memory build DIR     # write the test Qwen3-MoE (fp32, 64 experts x 2 layers)
    python -m benchmarks.moe_memory stream DIR    # qdora.core.load.load_model, experts adapted too
    python -m benchmarks.moe_memory naive DIR     # transformers from_pretrained (bf16) + adapt_model

Each mode prints peak RSS (getrusage), RSS after the load, the loaded model's bytes, and one layer's experts
in bf16 for scale; run each in a fresh process. RSS keeps freed heap pages, so `stream` also measures the
peak of live tensor bytes at the dispatcher (benchmarks/live_bytes.py): peak minus the loaded model is the
most full-precision data ever alive at once.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

LAYER = dict(hidden_size=1024, moe_intermediate_size=512, num_experts=64)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["build", "stream", "naive"])
    p.add_argument("model_dir")
    args = p.parse_args(argv)
    if args.mode == "build":
        from qdora.testing.tiny_models import build_tiny_model

        build_tiny_model(args.model_dir, family="qwen3_moe", tokenizer="qwen2", num_hidden_layers=2,
                         intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                         dtype=torch.float32, **LAYER)
        return
    from qdora.core.adapt import AdapterSpec, adapt_model

    spec = AdapterSpec(r=16, alpha=16, target="all-linear,experts", adapter_dtype="float32")
    import transformers  # noqa: F401  (import cost counted in the baseline below)

    base = peak_rss_mb()
    t0 = time.perf_counter()
    live = None
    if args.mode == "stream":
        from benchmarks.live_bytes import LiveBytes
        from qdora.core.load import load_model

        with LiveBytes() as live:
            model, _ = load_model(args.model_dir, spec, "cpu", torch.bfloat16)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
        adapt_model(model, spec)
    dt = time.perf_counter() - t0
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    layer_bf16 = 3 * LAYER["num_experts"] * LAYER["moe_intermediate_size"] * LAYER["hidden_size"] * 2
    print(f"{args.mode}: peak RSS {peak_rss_mb():.0f} MB (after imports {base:.0f} MB, after the load "
          f"{rss_mb():.0f} MB), model in memory {size / 2**20:.0f} MB, one layer's experts in bf16 "
          f"{layer_bf16 / 2**20:.0f} MB, {dt:.1f} s")
    if live is not None:
        print(f"stream: peak live tensor bytes {live.peak_new / 2**20:.1f} MB, of which above the loaded model "
              f"{(live.peak_new - size) / 2**20:.1f} MB (one expert tensor in fp32: "
              f"{LAYER['moe_intermediate_size'] * LAYER['hidden_size'] * 4 / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
