"""NF4 lm_head: row slices dequantize bit for bit like the whole weight; the head swap keeps the model's
output (up to NF4 quantization) and refuses heads it cannot take."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdora.core.layer import NF4Linear
from qdora.core.nf4 import nf4_from_weight
from qdora.core.nf4_head import dequantize_rows, lm_head_to_nf4, row_alignment
from qdora.errors import QdoraError


@pytest.mark.parametrize("out_f,in_f,dq", [(1000, 128, True), (515, 192, True), (300, 64, False)])
def test_row_slices_are_bit_exact(out_f, in_f, dq):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
    q = nf4_from_weight(w, double_quant=dq)
    full = q.dequantize(torch.float32)
    align = row_alignment(q.spec)
    assert (align * q.spec.blocks_per_row) % 256 == 0 or not dq
    stats = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.code)
    step = 3 * align
    for start in range(0, out_f, step):
        stop = min(start + step, out_f)
        got = dequantize_rows(*stats, q.spec, start, stop, torch.float32)
        assert torch.equal(got, full[start:stop])
    with pytest.raises(ValueError, match="multiple"):
        if align > 1:
            dequantize_rows(*stats, q.spec, 1, 2, torch.float32)
        else:
            raise ValueError("multiple (no alignment without double quantization)")


def test_lm_head_to_nf4_quantizes_real_and_meta_heads(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    dense = model.lm_head.weight.detach().clone()
    head = lm_head_to_nf4(model)
    assert isinstance(model.lm_head, NF4Linear) and model.get_output_embeddings() is head
    assert torch.equal(head.base.dequantize(torch.float32), nf4_from_weight(dense).dequantize(torch.float32))
    assert not any(p.requires_grad for p in head.parameters())
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config)
    assert lm_head_to_nf4(meta).base.packed.device.type == "meta"


def test_refuses_a_head_with_bias():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(64, 10, bias=True)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(QdoraError, match="dense"):
        lm_head_to_nf4(M())
