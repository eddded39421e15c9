"""A 70B-sized merge and one-step export onto a disk without room for them: refused in seconds.

The base is Llama-3-70B-shaped (80 layers, hidden 8192) but size-only: real safetensors headers in 30
shard files whose data regions are sparse (`truncate`), so the 141 GB checkpoint takes no disk and
nothing reads its data before the free-space check. The adapter is real (DoRA r=8 on q_proj, v_proj,
zeros). Each command runs as a child process; the benchmark refuses to run where the output disk has
room for the output (it would then write 141 GB).

    PYTHONPATH=$PWD python -m benchmarks.refuse_full_disk /tmp/refuse-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from qdora.core.adapt import AdapterSpec
from qdora.core.adapter_io import peft_key, save_adapter
from qdora.io.failures import human_bytes
from qdora.io.preflight import free_bytes
from qdora.tools.presets import preset_config

SHARDS = 30


def base_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint of `cfg`'s shape, in checkpoint order."""
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size //
                                                                                   cfg.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)})
    return shapes


def write_sparse_shard(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid bf16 safetensors file whose data region is a hole: full apparent size, no blocks."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def build(root: Path) -> tuple[Path, Path]:
    from qdora.testing.tiny_tokenizers import build_tokenizer

    base, adapter = root / "llama-3-70b-sizes", root / "adapter-70b"
    if (adapter / "adapter_config.json").is_file():
        return base, adapter
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    cfg = preset_config("llama-3-70b")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(base)
    build_tokenizer("llama3").save_pretrained(base)
    shapes = list(base_tensors(cfg).items())
    per = -(-len(shapes) // SHARDS)
    weight_map = {}
    for i in range(SHARDS):
        name = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        chunk = dict(shapes[i * per:(i + 1) * per])
        write_sparse_shard(base / name, chunk)
        weight_map.update({k: name for k in chunk})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    spec = AdapterSpec(method="dora", r=8, alpha=16, target=["q_proj", "v_proj"])
    h, kv = cfg.hidden_size, 1024
    state = {}
    for i in range(cfg.num_hidden_layers):
        for mod, out in (("q_proj", h), ("v_proj", kv)):
            path = f"model.layers.{i}.self_attn.{mod}"
            state[peft_key(path, "lora_A")] = torch.zeros(8, h)
            state[peft_key(path, "lora_B")] = torch.zeros(out, 8)
            state[peft_key(path, "magnitude")] = torch.ones(out)
    save_adapter(None, adapter, spec, base_model=str(base), state=state)
    return base, adapter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--output-dir", type=Path, default=None, help="where the outputs would go [ROOT/out]")
    args = ap.parse_args()
    base, adapter = build(args.root)
    out_dir = args.output_dir or args.root / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    apparent = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    on_disk = sum(f.stat().st_blocks * 512 for f in base.glob("*.safetensors"))
    free = free_bytes(out_dir) or 0
    print(f"base: {human_bytes(apparent)} apparent, {human_bytes(on_disk)} on disk; "
          f"{human_bytes(free)} free at {out_dir}")
    if free >= apparent:  # the bf16 merge output is as large as the bf16 base
        sys.exit("the output disk may have room for a 70B output: choose a smaller --output-dir (no 141 GB write)")
    cli = [sys.executable, "-m", "qdora.cli"]
    for label, cmd in (
        ("merge", [*cli, "merge", "--adapter", str(adapter), "--output", str(out_dir / "merged")]),
        ("export --adapter", [*cli, "export", "--adapter", str(adapter), "--output", str(out_dir / "m.gguf"),
                              "--quantize", "Q4_K_M"]),
    ):
        t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        err = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
        print(f"qdora {label}: exit {r.returncode} after {wall:.1f} s wall, {cpu:.1f} s CPU (incl. Python start "
              f"and imports); {err[-1] if err else r.stderr[-2000:]}")
        print(f"  files written under {out_dir}: {sorted(p.name for p in out_dir.iterdir())}")
    # the same refusal in this process, twice: the first pays transformers' lazy imports, the second is
    # the time the checks themselves take (read the adapter, build the meta model, read 30 headers)
    from qdora.export.merge import merge_adapter
    from qdora.io.failures import WriteFailure

    for label in ("first (with lazy imports)", "second (imports done)"):
        t = time.perf_counter()
        try:
            merge_adapter(adapter, out_dir / "merged")
        except WriteFailure:
            print(f"in-process merge_adapter, {label}: refused after {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
