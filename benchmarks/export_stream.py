"""Peak memory and disk of one-step `qdora export --adapter` against `qdora merge` + `qdora export --model`.

Same model as benchmarks/merge_stream.py (Llama-shaped, hidden 1024, MLP 2816, --layers 8: ~380 MB fp32;
DoRA r=16 all-linear). Each command runs in a fresh child; max RSS from `RUSAGE_CHILDREN`. Also checks
that the one-step GGUF is byte-identical to the two-step one, and reports the disk the two-step path
needed for the merged checkpoint that one step never writes.

    PYTHONPATH=$PWD python -m benchmarks.export_stream /tmp/merge-bench
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

from benchmarks.merge_stream import build, child_peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--outtype", default="f16")
    args = ap.parse_args()
    base, adapter = build(args.root, args.layers)
    work = args.root / "export-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    merged = work / adapter.name  # the merged folder takes the adapter's name: the same general.name
    cli = [sys.executable, "-m", "qdora.cli"]
    imports = [sys.executable, "-c", "import qdora.cli, qdora.export.merge, qdora.export.adapter_gguf, gguf, "
               "transformers, accelerate, bitsandbytes; from transformers import AutoModelForCausalLM"]
    runs = {
        "import-only child": imports,
        "qdora merge (bf16, 2GB shards)": [*cli, "merge", "--adapter", str(adapter), "--output", str(merged)],
        f"qdora export --model merged ({args.outtype})": [*cli, "export", "--model", str(merged), "--output",
                                                          str(work / "two.gguf"), "--outtype", args.outtype],
        f"qdora export --adapter ({args.outtype}, one step)": [*cli, "export", "--adapter", str(adapter),
                                                              "--output", str(work / "one.gguf"),
                                                              "--outtype", args.outtype],
    }
    results = {name: child_peak(cmd) for name, cmd in runs.items()}
    disk = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e6
    merged_mb = sum(f.stat().st_size for f in merged.iterdir()) / 1e6
    gguf_mb = (work / "one.gguf").stat().st_size / 1e6
    same = filecmp.cmp(work / "one.gguf", work / "two.gguf", shallow=False)
    print(f"base {disk:.0f} MB fp32 on disk; merged checkpoint {merged_mb:.0f} MB; GGUF {gguf_mb:.0f} MB; "
          f"one-step GGUF byte-identical to two-step: {same}")
    imp = results["import-only child"][0]
    print("| command | max RSS | above imports | wall |\n|---|---|---|---|")
    for name, (peak, wall) in results.items():
        print(f"| {name} | {peak:.0f} MB | {peak - imp:.0f} MB | {wall:.1f} s |")
    print(f"two-step peak disk: {merged_mb + gguf_mb:.0f} MB; one step: {gguf_mb:.0f} MB")


if __name__ == "__main__":
    main()
