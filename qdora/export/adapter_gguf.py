"""`qdora export --adapter`: adapter + base -> GGUF in one pass, without the merged HF checkpoint.

At 70B the merged bf16 checkpoint that `qdora merge` would write first is ~140 GB of disk. Here each
base tensor is read, merged exactly as `merge_adapter` merges it (same W', same cast to `dtype`) and
handed to the GGUF writer, one tensor at a time: the file is byte-identical to `qdora merge` followed by
`qdora export` of the merged folder (given the same general.name: the adapter folder's name), and peak
memory is one tensor's merge, as for `qdora merge` (less, as no output shard is held).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qdora.core.families import check_family
from qdora.errors import doing
from qdora.export.adapter_merge import AdapterMerge
from qdora.export.gguf_export import export_gguf
from qdora.export.gguf_tensors import TensorPlan
from qdora.options import BASE, torch_dtype


def merged_source(plan: AdapterMerge, base: str, dtype: torch.dtype):
    """A `TensorSource` giving each tensor as `merge_adapter` would have written it."""

    def source(p: TensorPlan, stack: contextlib.ExitStack) -> Any:
        key = p.source
        assert key is not None
        with doing(f"merging {key}"):
            return plan.output_tensor(key, plan.weight(key), base, dtype)

    return source


def _check_family(base_dir: Path) -> None:
    """The base must merge and export: refused before transformers builds it."""
    check_family(base_dir, ("merge", "export"), command="qdora export")


def export_adapter_gguf(
    adapter_dir: str | Path,
    output_path: str | Path,
    base_model: str | Path | None = None,
    base: str = "dequantized",
    dtype: str = "bf16",
    outtype: str = "f16",
    modelfile: bool = False,
    quantize: str | Sequence[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Merge the adapter onto its base (as `qdora merge --base BASE --dtype DTYPE`) straight into a GGUF.

    Everything is checked first (the adapter fits the base, the base exports, the output has room).
    Returns what `export_gguf` returns: the GGUF a user would run.
    """
    out_dtype = torch_dtype(dtype)
    BASE.check(base)
    plan = AdapterMerge.load(adapter_dir, base_model, revision, check_base=_check_family)
    plan.check_base_kind(base)
    return export_gguf(plan.base_dir, output_path, outtype=outtype, modelfile=modelfile, quantize=quantize,
                       name=Path(adapter_dir).resolve().name, source=merged_source(plan, base, out_dtype),
                       shapes={key: shape for key, (shape, _) in plan.headers().items()})
