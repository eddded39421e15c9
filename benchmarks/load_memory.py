"""Peak host memory of loading a model for QDoRA training: qdora's streaming loader vs the naive path.

    python -m benchmarks.load_memory build DIR     # write the ~370 MB fp32 test model once
    python -m benchmarks.load_memory stream DIR    # qdora.core.load.load_model (meta + safetensors streaming)
    python -m benchmarks.load_memory naive DIR     # transformers from_pretrained (fp32) + adapt_model

Each mode prints the process's peak RSS (getrusage) and the time; run each in a fresh process.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["build", "stream", "naive"])
    p.add_argument("model_dir")
    args = p.parse_args(argv)
    mode, model_dir = args.mode, args.model_dir
    if mode == "build":
        from qdora.testing.tiny_models import build_tiny_model

        build_tiny_model(model_dir, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, dtype=torch.float32)
        return
    from qdora.core.adapt import AdapterSpec, adapt_model

    spec = AdapterSpec(r=16, alpha=16, adapter_dtype="float32")
    import transformers  # noqa: F401  (import cost counted in the baseline below)

    base = peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "stream":
        from qdora.core.load import load_model

        model, _ = load_model(model_dir, spec, "cpu", torch.bfloat16)
    else:  # naive
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        adapt_model(model, spec)
    dt = time.perf_counter() - t0
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(f"{mode}: peak RSS {peak_rss_mb():.0f} MB (after imports {base:.0f} MB), "
          f"model in memory {size / 2**20:.0f} MB, {dt:.1f} s")


if __name__ == "__main__":
    main()
