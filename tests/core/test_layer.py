"""The QDoRA/QLoRA layer against PEFT (the oracle) on the same bitsandbytes NF4 base."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdora.core.layer import QDoRALinear, dora_row_norm, merge_weight
from qdora.testing.oracle import peft_pair


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


SHAPES = [(96, 128, 8), (128, 64, 1), (64, 192, 64), (200, 128, 16)]  # out != in, r = 1, r = 64


@pytest.mark.parametrize("method", ["dora", "lora"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("out,inn,r", SHAPES)
def test_matches_peft_forward_and_gradients(method, dtype, tol, out, inn, r):
    ours, pm, layer = peft_pair(out, inn, r, alpha=2 * r, method=method, dtype=dtype, bias=out % 2 == 0)
    x = torch.randn(2, 7, inn, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), pm(x2)
    assert y1.dtype == y2.dtype == dtype
    assert rel(y1, y2) <= tol
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    assert rel(x1.grad, x2.grad) <= tol
    assert rel(ours.lora_A.grad, layer.lora_A["default"].weight.grad) <= tol
    assert rel(ours.lora_B.grad, layer.lora_B["default"].weight.grad) <= tol
    if method == "dora":
        assert rel(ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad) <= tol


def test_matches_peft_with_rslora():
    ours, pm, _ = peft_pair(64, 128, 4, alpha=8, method="dora", dtype=torch.float32, rslora=True)
    assert ours.scale == pytest.approx(8 / 2)
    x = torch.randn(5, 128)
    assert rel(ours(x), pm(x)) <= 1e-4


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 80), inn=st.integers(1, 90), r=st.integers(1, 24),
    scale=st.floats(0.01, 8.0), seed=st.integers(0, 2**31 - 1),
)
def test_norm_expansion_equals_dense_norm(out, inn, r, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    a = torch.randn(r, inn, generator=g)
    b = torch.randn(out, r, generator=g)
    wd, ad, bd = w.double(), a.double(), b.double()
    dense_sq = (wd + scale * (bd @ ad)).pow(2).sum(1)
    fast_sq = dora_row_norm(w, a, b, scale, wd.pow(2).sum(1).float()).double().pow(2)
    # fp32 error model of the expansion: relative to the size of the terms summed, not to the (possibly
    # tiny) result. Every term of ||W_i||² + 2s⟨W_i, B_iA⟩ + s²·Σ_jk B_ij (AAᵀ)_jk B_ik is bounded by
    # (||W_i|| + s·Σ_j |B_ij|·||A_j||)², which is large when the rows of A cancel each other.
    bound = (wd.norm(dim=1) + scale * (bd.abs() @ ad.norm(dim=1))).pow(2)
    assert ((fast_sq - dense_sq).abs() <= 1e-5 * bound + 1e-20).all()


def test_init_reproduces_base_and_lora_b_is_zero():
    lin = torch.nn.Linear(128, 64)
    layer = QDoRALinear.from_linear(lin, r=4, alpha=8, adapter_dtype=torch.float32)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(3, 128)
    expected = x @ layer.base.dequantize(torch.float32).t() + lin.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_train():
    layer = QDoRALinear.from_linear(torch.nn.Linear(64, 32, bias=True), r=2)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "magnitude"}
    lora = QDoRALinear.from_linear(torch.nn.Linear(64, 32), r=2, method="lora")
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_merged_weight_reproduces_the_forward():
    layer = QDoRALinear.from_linear(torch.nn.Linear(128, 48, bias=False), r=4, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
        layer.magnitude.mul_(1.3)
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), x @ layer.merged_weight().t(), rtol=1e-5, atol=1e-5)


def test_merge_weight_lora_is_plain_sum():
    w, a, b = torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    torch.testing.assert_close(merge_weight(w, a, b, None, 0.5), w + 0.5 * b @ a)


def test_dropout_only_touches_the_adapter_path():
    layer = QDoRALinear.from_linear(torch.nn.Linear(64, 32, bias=False), r=4, dropout=0.5,
                                    adapter_dtype=torch.float32)
    x = torch.randn(6, 64)
    layer.train()
    # B = 0 at init: the adapter path contributes nothing, so dropout must not change the output
    torch.testing.assert_close(layer(x), x @ layer.base.dequantize(torch.float32).t())
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # with B != 0, dropout on the adapter's input shows
    layer.eval()  # and evaluation turns it off: exactly the merged weight
    merged = merge_weight(layer.base.dequantize(torch.float32), layer.lora_A, layer.lora_B, layer.magnitude,
                          layer.scale)
    torch.testing.assert_close(layer(x), x @ merged.t())


def test_no_input_grad_skips_dequantization_and_still_trains():
    layer = QDoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, adapter_dtype=torch.float32)
    x = torch.randn(5, 64)  # no requires_grad: first layer after a frozen embedding
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None and layer.magnitude.grad is not None


def test_output_has_the_input_dtype():
    layer = QDoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, adapter_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(5, 64)).dtype == torch.float32
        assert layer(torch.randn(5, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bf16_autocast_matches_peft_with_fp32_inputs():
    """Same contract as PEFT on bnb's Linear4bit under autocast: fp32 in, bf16 compute, fp32 out."""
    ours, pm, layer = peft_pair(96, 128, 8, 16, "dora", torch.float32, bias=True)
    layer.base_layer.compute_dtype = torch.bfloat16
    x = torch.randn(3, 5, 128)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = ours(x1), pm(x2)
    assert y1.dtype == y2.dtype == torch.float32
    assert rel(y1, y2) <= 1e-2
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    assert rel(x1.grad, x2.grad) <= 1e-2
    assert rel(ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad) <= 1e-2


def test_small_magnitude_changes_survive_bf16_autocast():
    """Under bf16 autocast with an fp32 residual stream, a 0.1% magnitude change reaches the output.

    Computing y·(m/n) in bf16 would round m/n to exactly 1.0 (found by the speed benchmark: dora and
    lora gave bit-identical losses for several steps). The output keeps x's dtype, as bnb's Linear4bit.
    """
    lin = torch.nn.Linear(128, 64, bias=False)
    layer = QDoRALinear.from_linear(lin, r=4, adapter_dtype=torch.float32)
    x = torch.randn(16, 128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = layer(x)
        layer.magnitude.mul_(1.001)
        after = layer(x)
    assert before.dtype == after.dtype == torch.float32
    ratio = (after / before).median().item()
    assert abs(ratio - 1.001) < 1e-5, ratio


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["dora", "lora"])
def test_matches_peft_on_cuda(method):
    ours, pm, layer = peft_pair(256, 512, 16, 32, method, torch.bfloat16)
    ours, pm = ours.cuda(), pm.cuda()
    x = torch.randn(4, 33, 512, dtype=torch.bfloat16, device="cuda")
    assert rel(ours(x), pm(x)) <= 1e-2
