"""Peak host memory of loading a model for QDoRA training: qdora's streaming loader vs the naive path.

    python benchmarks/load_memory.py build DIR         # write the ~370 MB fp32 test model once
    python benchmarks/load_memory.py stream DIR        # qdora.core.load.load_model (meta + safetensors streaming)
    python benchmarks/load_memory.py naive DIR         # transformers from_pretrained (fp32) + adapt_model

Each mode prints the process's peak RSS (getrusage) and the time; run each in a fresh process.
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    mode, model_dir = sys.argv[1], sys.argv[2]
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
    elif mode == "naive":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        adapt_model(model, spec)
    else:
        raise SystemExit(f"unknown mode {mode}")
    dt = time.perf_counter() - t0
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(f"{mode}: peak RSS {peak_rss_mb():.0f} MB (after imports {base:.0f} MB), "
          f"model in memory {size / 2**20:.0f} MB, {dt:.1f} s")


if __name__ == "__main__":
    main()
