"""qdora's training loss on an MoE model is the model's own `labels=` loss with its router's auxiliary
load-balancing term (transformers' function and coefficient), and dense models get none."""

from __future__ import annotations

import pytest
import torch

from qdora.core.adapt import AdapterSpec
from qdora.core.load import load_model
from qdora.testing.tiny_models import build_tiny_model
from qdora.train.router_loss import router_loss_of
from qdora.train.step import CausalLMLoss


@pytest.mark.parametrize("family,tokenizer", [("qwen3_moe", "qwen2"), ("mixtral", "llama3")])
def test_loss_equals_the_models_own_loss_with_router_logits(tmp_path, family, tokenizer):
    d = build_tiny_model(tmp_path / family, family=family, tokenizer=tokenizer, seed=2, initializer_range=0.2)
    lm, _ = load_model(d, AdapterSpec(r=4, alpha=8, target="all-linear,experts", adapter_dtype="float32"),
                       "cpu", torch.float32)
    ids = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :6] = -100
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # padding: the model masks it out of the load-balancing statistics
    labels[1, -4:] = -100
    loss_sum, count = CausalLMLoss(lm)(input_ids=ids, labels=labels, attention_mask=mask)
    own = lm(input_ids=ids, labels=labels, attention_mask=mask, output_router_logits=True)
    assert own.aux_loss > 0 and lm.router_aux_loss_coef == 0.01
    torch.testing.assert_close(loss_sum / count, own.loss, rtol=1e-6, atol=1e-6)
    plain = lm(input_ids=ids, labels=labels, attention_mask=mask).loss  # without the auxiliary term
    assert abs((loss_sum / count - plain).item() - 0.01 * own.aux_loss.item()) < 1e-5  # fp32 eps of a ~7 loss


def test_dense_models_have_no_router_loss(tiny_llama_dir):
    lm, _ = load_model(tiny_llama_dir, AdapterSpec(r=4), "cpu", torch.float32)
    assert router_loss_of(lm) is None
