"""`qdora merge`: fold a (Q)DoRA/(Q)LoRA adapter into a full-precision Hugging Face checkpoint, streaming.

Each decoder-block linear W becomes W' = m ⊙ (Ŵ + s·B·A) / ||Ŵ + s·B·A||_row (lora: Ŵ + s·B·A), where
Ŵ is by default the dequantized NF4 weight training saw; untargeted block linears are written as Ŵ too,
so the merged model computes what the trained model computed. `base="original"` merges onto the
checkpoint's full-precision W instead. A base saved pre-quantized by bitsandbytes (NF4) has no
full-precision W: its weights are dequantized from the stored bytes, and `original` is refused.
The base is read one tensor at a time and written in shards, so
peak memory is about one output shard plus one layer. Output goes to a temporary folder next to the
destination, renamed at the end: an error leaves nothing behind, and an older output being replaced
stays in place until the new one is complete. Before anything is written the output folder must be
writable and have room for the whole output, computed from the base's tensor shapes and the dtype.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qdora.core.families import check_family
from qdora.errors import QdoraError, doing
from qdora.export.adapter_merge import AdapterMerge, edited_config
from qdora.io.os_errors import writing
from qdora.io.preflight import check_output
from qdora.io.weights import INDEX, SINGLE, WEIGHT_SUFFIXES, ShardedWriter, WeightReader, parse_size
from qdora.options import BASE, torch_dtype


@dataclass
class MergeResult:
    output: Path
    merged: int  # weights with an adapter folded in
    dequantized: int  # untargeted block linears written as their NF4 round trip
    shards: int
    total_bytes: int
    prequantized_base: bool = False  # the base held NF4 bytes only: merged onto their dequantized weights


# bytes per element of the safetensors dtypes that are not floating point (kept as they are by a merge)
_ITEMSIZE = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# safetensors header bytes per tensor (name, dtype, shape, offsets as JSON), generously
_HEADER_PER_TENSOR = 256


def output_bytes(reader: WeightReader, base_dir: Path, dtype: torch.dtype,
                 headers: dict[str, tuple[tuple[int, ...], str]] | None = None) -> int:
    """Bytes `merge_adapter` will write: every output tensor (`headers`: name -> output shape and dtype,
    default the base's own; floating ones in `dtype`), the safetensors headers and index, and the side
    files copied from the base folder."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape, dt in (reader.headers() if headers is None else headers).values():
        is_float = dt.startswith(("F", "BF"))
        total += math.prod(shape) * (size if is_float else _ITEMSIZE.get(dt, 8)) + _HEADER_PER_TENSOR
    side = sum(f.stat().st_size for f in base_dir.iterdir()
               if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != INDEX)
    return total + side + 2 * _HEADER_PER_TENSOR * len(set(reader.files.values()))  # per shard file


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise QdoraError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise QdoraError(f"output folder {output} is not empty: pass --overwrite to replace it")


def _copy_side_files(base_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """config.json (edited), generation config, tokenizer, chat template, README...: every top-level
    file except weights, so the folder loads with plain `from_pretrained`."""
    for f in base_dir.iterdir():
        if not f.is_file() or f.name in ("config.json", INDEX, SINGLE) or f.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(edited_config(base_dir, dtype), indent=2) + "\n")


def _publish(tmp: Path, output: Path) -> None:
    """Move the finished folder into place (replacing an old one only now that the new one is complete)."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    try:
        tmp.rename(output)
    except BaseException:
        if old is not None:  # put the old output back: a failed merge loses nothing
            old.rename(output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_family(base_dir: Path) -> None:
    """The base's family must merge (and is expected to export): refused before transformers builds it."""
    check_family(base_dir, ("merge", "export"), allow_no_export=True, command="qdora merge")


def merge_adapter(
    adapter_dir: str | Path,
    output: str | Path,
    base_model: str | Path | None = None,
    dtype: str = "bf16",
    base: str = "dequantized",
    shard_size: str | int = "2GB",
    overwrite: bool = False,
    revision: str | None = None,
) -> MergeResult:
    """Write the merged model to `output` (see the module docstring); returns what was done."""
    out_dtype = torch_dtype(dtype)
    BASE.check(base)
    shard_bytes = parse_size(shard_size)
    output = Path(output)
    _check_output(output, overwrite)
    plan = AdapterMerge.load(adapter_dir, base_model, revision, check_base=_check_family)
    plan.check_base_kind(base)
    needed = output_bytes(plan.reader, plan.base_dir, out_dtype, plan.headers())
    check_output(output, needed, "the merged model")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with writing(output, "the merged model", needed):
        output.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            writer = ShardedWriter(tmp, shard_bytes)
            merged = dequantized = 0
            for key, tensor in plan.tensors():
                with doing(f"merging {key}"):
                    if key in plan.linear_keys:
                        merged += key in plan.adapters
                        dequantized += key not in plan.adapters and base == "dequantized"
                    writer.add(key, plan.output_tensor(key, tensor, base, out_dtype))
                    del tensor
            with doing("writing the last shard and the side files"):
                shards = writer.close()
                _copy_side_files(plan.base_dir, tmp, out_dtype)
                _publish(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return MergeResult(output, merged, dequantized, len(shards), writer.total_bytes, bool(plan.prequantized))
