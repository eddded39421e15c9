"""NF4 storage: bytes identical to bitsandbytes' Params4bit, faithful dequantization, row norms."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qdora.core.nf4 import NF4Spec, NF4Weight, nf4_from_weight
from qdora.errors import QdoraError


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (96, 192), (1, 64), (300, 256)])
def test_bytes_match_params4bit(shape, double_quant):
    w = torch.randn(*shape)
    ref = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                            compress_statistics=double_quant, blocksize=64).to("cpu")
    ours = nf4_from_weight(w, double_quant=double_quant, storage_dtype=torch.uint8)
    assert torch.equal(ours.packed.data.reshape(-1), ref.data.reshape(-1))
    deq_ref = bnb.functional.dequantize_4bit(ref.data, ref.quant_state)
    assert torch.equal(ours.dequantize(torch.float32), deq_ref)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_storage_views_dequantize_identically(storage):
    w = torch.randn(128, 256)
    a = nf4_from_weight(w, storage_dtype=torch.uint8)
    b = nf4_from_weight(w, storage_dtype=storage)
    assert b.packed.dtype == storage and b.absmax.dtype == storage
    assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))
    assert torch.equal(a.packed.data.view(torch.uint8), b.packed.data.view(torch.uint8))


def test_frozen_parameters_and_row_layout():
    nf4 = nf4_from_weight(torch.randn(48, 128))
    params = dict(nf4.named_parameters())
    assert set(params) == {"packed", "absmax"}
    assert all(not p.requires_grad for p in params.values())
    assert params["packed"].shape[0] == 48 and params["absmax"].shape[0] == 48
    buffers = dict(nf4.named_buffers())
    assert all(t.dim() == 1 for t in buffers.values())  # never 0-dim: FSDP2 and state dicts agree


def test_row_slices_quantize_like_the_whole_without_double_quant():
    """Row layout: a row slice quantized alone gives the same bytes as that slice of the whole."""
    w = torch.randn(64, 128)
    whole = nf4_from_weight(w, double_quant=False, storage_dtype=torch.uint8)
    part = nf4_from_weight(w[16:40], double_quant=False, storage_dtype=torch.uint8)
    assert torch.equal(whole.packed.data[16:40], part.packed.data)
    assert torch.equal(whole.absmax.data[16:40], part.absmax.data)


def test_dequantization_error_is_nf4_sized():
    w = torch.randn(256, 256)
    deq = nf4_from_weight(w).dequantize(torch.float32)
    rel = ((deq - w).norm() / w.norm()).item()
    assert 0.05 < rel < 0.15  # 4-bit: clearly lossy, clearly not garbage


def test_row_norms_are_of_the_dequantized_weight():
    nf4 = nf4_from_weight(torch.randn(32, 128))
    expected = nf4.dequantize(torch.float32).pow(2).sum(1)
    torch.testing.assert_close(nf4.row_norm_sq, expected)


def test_refuses_rows_that_split_blocks():
    with pytest.raises(QdoraError, match="multiple of the NF4 block size 64"):
        NF4Weight(NF4Spec(16, 100))


def test_state_dict_round_trip():
    src = nf4_from_weight(torch.randn(32, 128))
    dst = NF4Weight(NF4Spec(32, 128), storage_dtype=src.storage_dtype)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(src.dequantize(torch.float32), dst.dequantize(torch.float32))
