"""Whole tensors and shards: one process here (FSDP2 shards are covered by the 2-rank tests in
tests/core/test_layer_fsdp.py and tests/train/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdora.core.shards import fill_param, whole
from qdora.errors import QdoraError


def test_fill_param_copies_in_the_parameters_dtype_and_whole_reads_it_back():
    p = nn.Parameter(torch.zeros(3, 2, dtype=torch.bfloat16))
    src = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    fill_param(p, src)
    assert p.dtype == torch.bfloat16 and torch.equal(p.float(), src)
    got = whole(p)
    assert not got.requires_grad and got.data_ptr() == p.data_ptr()  # no copy for a plain tensor


def test_fill_param_refuses_another_shape():
    with pytest.raises(QdoraError, match=r"expected \(3, 2\), got \(2, 3\)"):
        fill_param(nn.Parameter(torch.zeros(3, 2)), torch.zeros(2, 3))
