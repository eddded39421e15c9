"""The frozen lm_head in NF4, dequantized a slice of vocabulary rows at a time.

At 70B the lm_head is 128256 × 8192: 2 GiB in bf16, gathered on every GPU all step under FSDP2 (it is
in the root group). In NF4 it is 0.52 GiB. It is never dequantized whole: the loss
(qdora/train/nf4_head_loss.py) walks the vocabulary in row slices, so the largest dense piece is one
[slice, hidden] matrix.

Row slices are exact: NF4 blocks never cross rows (64 | in_features), and a slice starting on a row
whose first block index is a multiple of 256 takes its second-level statistics (one per 256 blocks) as a
plain slice too, so `dequantize_rows` gives bit for bit the rows of the full dequantization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qdora.core.layer import NF4Linear
from qdora.core.nf4 import NESTED_BLOCKSIZE, NF4Spec, dequantize_nf4
from qdora.errors import QdoraError


def row_alignment(spec: NF4Spec) -> int:
    """Slices must start on multiples of this many rows (so their nested statistics are a plain slice)."""
    if not spec.double_quant:
        return 1
    return NESTED_BLOCKSIZE // math.gcd(spec.blocks_per_row, NESTED_BLOCKSIZE)


def dequantize_rows(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor,
                    offset: torch.Tensor, code: torch.Tensor, spec: NF4Spec, start: int, stop: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of the dequantized [out, in] weight; `start` a multiple of `row_alignment`."""
    if start % row_alignment(spec):
        raise ValueError(f"row slice must start on a multiple of {row_alignment(spec)}, not {start}")
    rows = NF4Spec(stop - start, spec.in_features, spec.double_quant, spec.blocksize)
    if spec.double_quant:
        b0, b1 = start * spec.blocks_per_row, stop * spec.blocks_per_row
        absmax2 = absmax2[b0 // NESTED_BLOCKSIZE: -(-b1 // NESTED_BLOCKSIZE)]
    return dequantize_nf4(packed[start:stop], absmax[start:stop], absmax2, code2, offset, code, rows, dtype)


def lm_head_to_nf4(model: nn.Module, double_quant: bool = True, storage_dtype: torch.dtype | None = None
                   ) -> NF4Linear:
    """Replace the model's output linear with a frozen `NF4Linear` (empty on meta: the loader fills it)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise QdoraError(f"{type(model).__name__}'s lm_head is {type(head).__name__}"
                         f"{' with a bias' if isinstance(head, nn.Linear) else ''}: use --lm-head dense")
    nf4 = NF4Linear.from_linear(head, double_quant, storage_dtype)
    model.set_output_embeddings(nf4)
    return nf4
