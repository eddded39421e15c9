"""Peak memory of `qdora merge` on a model a few hundred MB on disk: is it bounded by one shard + one layer?

Builds (once) a Llama-shaped model (hidden 1024, MLP 2816, --layers 8: ~380 MB fp32) and a DoRA r=16
all-linear adapter with trained-like values, then runs the CLI in a child process and reports its max
RSS (`resource.getrusage(RUSAGE_CHILDREN)`), next to a child that only imports what the CLI imports.

    python -m benchmarks.merge_stream /tmp/merge-bench --shard-size 50MB --dtype bf16
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(root: Path, layers: int) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    from qdora.core.adapt import AdapterSpec, adapt_model, adapter_layers
    from qdora.core.adapter_io import save_adapter
    from qdora.testing.tiny_models import build_tiny_model

    base, adapter = root / "base", root / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        build_tiny_model(base, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        spec = AdapterSpec(method="dora", r=16, alpha=16, adapter_dtype="float32")
        adapt_model(model, spec)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
                layer.magnitude.mul_(1 + 0.05 * torch.randn(layer.magnitude.shape, generator=g))
        save_adapter(model, adapter, spec, base_model=str(base))
    return base, adapter


def child_peak(cmd: list[str]) -> tuple[float, float]:
    """(max RSS in MB, wall seconds) of one child process; RUSAGE_CHILDREN is the max over finished children,
    so each measurement runs in its own fresh Python that spawns exactly one child."""
    code = ("import resource,subprocess,sys,time;t=time.time();subprocess.run(sys.argv[1:],check=True);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout
    peak, wall = out.split()[-2:]
    return float(peak), float(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--shard-size", default="50MB")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    base, adapter = build(args.root, args.layers)
    disk = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e6
    imports = [sys.executable, "-c", "import qdora.cli, qdora.export.merge, transformers, accelerate, bitsandbytes;"
               "from transformers import AutoModelForCausalLM"]
    merge = [sys.executable, "-m", "qdora.cli", "merge", "--adapter", str(adapter), "--output",
             str(args.root / f"merged-{args.dtype}"), "--dtype", args.dtype, "--shard-size", args.shard_size,
             "--overwrite"]
    imp_peak, _ = child_peak(imports)
    t = time.time()
    peak, wall = child_peak(merge)
    out_mb = sum(f.stat().st_size for f in (args.root / f"merged-{args.dtype}").glob("*.safetensors")) / 1e6
    print(f"base {disk:.0f} MB on disk (fp32), output {out_mb:.0f} MB {args.dtype}, shard size {args.shard_size}")
    print(f"merge: max RSS {peak:.0f} MB, {wall:.1f} s wall; import-only child: max RSS {imp_peak:.0f} MB")
    print(f"=> merge working set above imports: {peak - imp_peak:.0f} MB ({time.time() - t:.0f} s incl. spawn)")


if __name__ == "__main__":
    main()
