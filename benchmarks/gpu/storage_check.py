"""Do all 65,536 16-bit patterns survive every path NF4 bytes take on this device, bit for bit?

On torch < 2.13 the packed NF4 bytes are stored viewed as bfloat16 (FSDP2 there refuses uint8
parameters). About 0.4% of 16-bit patterns are bf16 NaNs, and any copy that goes through fp32 (CUDA's
`_foreach_copy_` does) rewrites them to one canonical NaN: silently different weights. CPU copies keep
the bits, so only a run on the GPU proves a path. The patterns are written into the packed bytes of the
first decoder layer's gate_proj and up_proj of a random-weight tiny Llama (32,768 words each), and every
path is checked by comparing the bytes after it with the bytes before.

Rows marked `qdora` are paths qdora takes and must be exact; rows marked `diagnostic` show the raw
fault (expected to change words on CUDA with bf16 storage: that is why qdora avoids those paths).

    python -m benchmarks.gpu.storage_check --device cuda --storage bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

PATTERNS = 65536
PATHS = ("gate_proj", "up_proj")  # layer 0: 2 × 32,768 packed words hold every pattern once


def all_patterns() -> torch.Tensor:
    """Every 16-bit pattern once, as int16 (viewed as bf16 or as 2 bytes by the storage)."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, on the CPU (uint8, flat): what must not change."""
    return t.detach().contiguous().view(torch.uint8).reshape(-1).cpu().clone()


def changed_words(a: torch.Tensor, b: torch.Tensor) -> int:
    """16-bit words that differ between two byte strings (a length mismatch counts every word)."""
    if a.numel() != b.numel():
        return a.numel() // 2
    return int((a.view(torch.int16) != b.view(torch.int16)).sum())


def build(device: torch.device):
    """A tiny random Llama with qdora layers whose layer-0 gate/up packed bytes hold every pattern."""
    from benchmarks.bench_model import build_qdora
    from qdora.tools.presets import preset_config

    model = build_qdora(preset_config("tiny"), "dora", 4, 8.0, device, torch.bfloat16)
    pats = all_patterns().view(torch.uint8).to(device)
    mlp = model.model.layers[0].mlp
    start = 0
    with torch.no_grad():
        for name in PATHS:
            packed = getattr(mlp, name).base.packed
            n = packed.numel() * packed.element_size()
            packed.data.view(torch.uint8).reshape(-1).copy_(pats[start:start + n])
            start += n
    assert start == 2 * PATTERNS, start
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def expected_bytes() -> torch.Tensor:
    return bits(all_patterns())


def packed_params(model) -> list[torch.Tensor]:
    mlp = model.model.layers[0].mlp
    return [getattr(mlp, name).base.packed for name in PATHS]


def capture_unsharded(model) -> tuple[list, list]:
    """Hooks that record the packed bytes as the layers see them in forward (after any all-gather)."""
    seen: list[torch.Tensor] = []
    handles = []
    mlp = model.model.layers[0].mlp
    for name in PATHS:
        layer = getattr(mlp, name)
        handles.append(layer.register_forward_pre_hook(lambda mod, args: seen.append(bits(mod.base.packed))))
    return seen, handles


def simple_paths(device: torch.device, storage: torch.dtype) -> dict[str, int]:
    """Tensor-level paths: device moves, copies, save/load (no model)."""
    src = all_patterns().view(storage) if storage == torch.bfloat16 else all_patterns().view(torch.uint8)
    ref = bits(src)
    on = src.to(device)
    res = {
        "qdora: .to(device) and back": changed_words(ref, bits(on.cpu())),
        "qdora: clone on device": changed_words(ref, bits(on.clone())),
        "qdora: copy_ on device": changed_words(ref, bits(torch.empty_like(on).copy_(on))),
        "qdora: view(uint8) copy on device": changed_words(ref, bits(on.view(torch.uint8).clone())),
    }
    dst = [torch.empty_like(on)]
    torch._foreach_copy_(dst, [on])
    res["diagnostic: torch._foreach_copy_ in the storage dtype"] = changed_words(ref, bits(dst[0]))
    if storage == torch.bfloat16:
        res["diagnostic: .float() and back to bf16"] = changed_words(ref, bits(on.float().to(torch.bfloat16)))
    with tempfile.TemporaryDirectory() as d:
        torch.save({"t": on}, Path(d) / "t.pt")
        res["qdora: torch.save / torch.load"] = changed_words(
            ref, bits(torch.load(Path(d) / "t.pt", map_location=device)["t"]))
        from safetensors.torch import load_file, save_file

        save_file({"t": on.contiguous()}, str(Path(d) / "t.safetensors"))
        res["qdora: safetensors save / load"] = changed_words(
            ref, bits(load_file(str(Path(d) / "t.safetensors"), device=str(device))["t"]))
    return res


def fsdp_path(device: torch.device, policy: str) -> dict[str, int]:
    """One FSDP2 configuration on a 1-rank group: shard, all-gather in forward and backward, full_tensor."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from qdora.core.adapt import decoder_blocks
    from qdora.train.distributed import shard_model

    model = build(device)
    ref = expected_bytes()
    if policy in ("qdora", "qdora+offload"):
        shard_model(model, torch.bfloat16, offload_params=policy == "qdora+offload")
    elif policy == "bf16 MixedPrecisionPolicy":  # what qdora must not do with bf16-viewed bytes
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in decoder_blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    else:
        raise ValueError(policy)
    seen, handles = capture_unsharded(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if policy.startswith("qdora") else _null()
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # the recompute all-gathers again
    for h in handles:
        h.remove()
    name = f"FSDP2 ({policy})"
    kind = "qdora" if policy.startswith("qdora") else "diagnostic"
    res = {}
    fwd = [seen[i] for i in range(len(seen))]
    if len(fwd) < 2 * len(PATHS):
        raise RuntimeError(f"{name}: expected a forward and a recompute per layer, saw {len(fwd)} captures")
    n = len(PATHS)
    res[f"{kind}: {name} all-gather in forward"] = changed_words(ref, torch.cat(fwd[:n]))
    res[f"{kind}: {name} all-gather in backward recompute"] = changed_words(ref, torch.cat(fwd[n:2 * n]))
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in packed_params(model)]
    res[f"{kind}: {name} full_tensor()"] = changed_words(ref, torch.cat([bits(t) for t in full]))
    return res


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--storage", default=None, choices=["bfloat16", "uint8"],
                   help="NF4 storage layout (default: torch's, as qdora picks it)")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    if args.storage:
        os.environ["QDORA_NF4_STORAGE"] = args.storage
    import torch.distributed as dist

    from qdora.core.nf4 import default_storage_dtype
    from qdora.train.distributed import free_port, process_group_backend

    device = torch.device(args.device)
    storage = default_storage_dtype()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = simple_paths(device, storage)
    dist.init_process_group(process_group_backend(device), rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        policies = ["qdora", "bf16 MixedPrecisionPolicy"] + (["qdora+offload"] if device.type == "cuda" else [])
        for policy in policies:
            try:
                results.update(fsdp_path(device, policy))
            except Exception as e:  # noqa: BLE001  (a refused configuration is a result too)
                kind = "qdora" if policy.startswith("qdora") else "diagnostic"
                results[f"{kind}: FSDP2 ({policy}) refused: {type(e).__name__}: {str(e)[:200]}"] = -1
    finally:
        dist.destroy_process_group()
    report = dict(device=str(device), storage=str(storage).replace("torch.", ""), torch=torch.__version__,
                  patterns=PATTERNS, changed_words=results)
    for k, v in results.items():
        print(f"{v:6d}  {k}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    bad = [k for k, v in results.items() if k.startswith("qdora") and v != 0]
    verdict = "every qdora path bit-exact" if not bad else "CHANGED: " + "; ".join(bad)
    print(f"storage {report['storage']} on {device}: {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
