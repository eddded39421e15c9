"""The chunked loss equals the naive full-logits cross-entropy, and never allocates the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qdora.train.loss import LogitsTransform, chunked_causal_lm_loss, chunked_cross_entropy


def _naive(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
        reduction="sum",
    )


def _case(dtype, batch=2, seq=37, hid=16, vocab=101, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hid, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hid, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < ignore_frac] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 1000])
def test_fp32_matches_naive_value_and_grads(chunk):
    hidden, weight, labels = _case(torch.float32)
    ref = _naive(hidden, weight, labels)
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    total, count = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    got_h, got_w = torch.autograd.grad(total, (hidden, weight))
    assert count.item() == (labels[:, 1:] != -100).sum().item()
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-5)


def test_mean_form_and_upstream_gradient_scale():
    hidden, weight, labels = _case(torch.float32, seed=3)
    ref = _naive(hidden, weight, labels) / (labels[:, 1:] != -100).sum()
    (ref * 2.5).backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=7)
    (loss * 2.5).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_w, rtol=1e-5, atol=1e-6)


def test_bf16_close_to_fp32_reference():
    hidden, weight, labels = _case(torch.bfloat16, seq=64, hid=32, vocab=257, seed=1)
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = _naive(h32, w32, labels)
    ref_h, ref_w = torch.autograd.grad(ref, (h32, w32))
    total, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=16)
    got_h, got_w = torch.autograd.grad(total, (hidden, weight))
    assert total.dtype == torch.float32
    assert got_h.dtype == got_w.dtype == torch.bfloat16
    torch.testing.assert_close(total, ref, rtol=2e-2, atol=1e-1)
    torch.testing.assert_close(got_h.float(), ref_h, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got_w.float(), ref_w, rtol=5e-2, atol=5e-2)


def test_mixed_dtypes_and_autocast_use_the_weight_dtype():
    hidden, weight, labels = _case(torch.float32, seq=32, hid=16, vocab=64, seed=5)
    w16 = weight.detach().bfloat16()
    ref = _naive(hidden.bfloat16(), w16, labels)
    total, _ = chunked_cross_entropy(hidden, w16, labels, chunk_size=8)
    torch.testing.assert_close(total, ref, rtol=1e-3, atol=1e-3)
    (grad,) = torch.autograd.grad(total, hidden)
    assert grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    (auto_grad,) = torch.autograd.grad(auto, hidden)
    plain, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    assert torch.equal(auto, plain) and torch.equal(auto_grad, plain_grad)


def test_all_ignored_rows_and_all_ignored_batch():
    hidden, weight, labels = _case(torch.float32, seed=2)
    labels[0] = -100  # one whole row without targets
    ref = _naive(hidden, weight, labels)
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    total, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
    got_h, got_w = torch.autograd.grad(total, (hidden, weight))
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(got_h, ref_h)
    torch.testing.assert_close(got_w, ref_w)
    assert torch.all(got_h[0] == 0)

    labels[:] = -100
    total, count = chunked_cross_entropy(hidden, weight, labels)
    assert count.item() == 0 and total.item() == 0.0
    got_h, got_w = torch.autograd.grad(chunked_causal_lm_loss(hidden, weight, labels), (hidden, weight))
    assert torch.all(got_h == 0) and torch.all(got_w == 0)


def test_frozen_weight_gets_no_gradient_work():
    hidden, weight, labels = _case(torch.float32, seed=4)
    weight = weight.detach()
    total, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=9)
    total.backward()
    assert hidden.grad is not None and weight.grad is None


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_peak_tensor_is_one_chunk_of_logits_not_the_full_logits():
    seq, vocab, hid, chunk = 512, 1000, 8, 32
    hidden = torch.randn(1, seq, hid, requires_grad=True)
    weight = torch.randn(vocab, hid)  # frozen lm_head, the QDoRA case
    labels = torch.randint(0, vocab, (1, seq))
    with _LargestTensor() as mode:
        total, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        total.backward()
    assert mode.largest <= chunk * vocab < seq * vocab // 10
    with _LargestTensor() as naive_mode:
        _naive(hidden, weight, labels).backward()
    assert naive_mode.largest >= (seq - 1) * vocab  # the measurement does see full logits when they exist


@pytest.mark.cuda
def test_cuda_peak_memory_is_chunk_sized():
    seq, vocab, hid, chunk = 4096, 32000, 256, 256
    hidden = torch.randn(1, seq, hid, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hid, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (1, seq), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    total, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    total.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_fp32_logits = seq * vocab * 4
    assert extra < full_fp32_logits / 4, (extra, full_fp32_logits)


@pytest.mark.parametrize("transform", [LogitsTransform(softcap=3.0), LogitsTransform(scale=0.25),
                                       LogitsTransform(scale=1.7, softcap=2.0)])
def test_logits_transform_value_and_grads(transform):
    """Soft-capping / scaling inside the chunks: value and both gradients equal autograd on the full logits."""
    hidden, weight, labels = _case(torch.float32, seed=5)
    logits = transform((hidden @ weight.t()).float())
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    total, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=7, transform=transform)
    got_h, got_w = torch.autograd.grad(total, (hidden, weight))
    assert abs(total.item() - _naive(hidden, weight, labels).item()) > 1e-3  # the transform changed the loss
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-5)


def test_logits_transform_from_config():
    assert LogitsTransform.from_config({"final_logit_softcapping": 30.0}) == LogitsTransform(softcap=30.0)
    assert LogitsTransform.from_config({"logits_scaling": 4.0}) == LogitsTransform(scale=0.25)
    assert LogitsTransform.from_config({"model_type": "llama"}).identity


class _Ops(TorchDispatchMode):
    """Records the name of every op that runs."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def test_no_op_waits_for_the_device():
    """No nonzero / item / boolean indexing: on a GPU each makes the host wait for the device, every micro
    step, so the GPU idles while the backward's launches are queued."""
    hidden, weight, labels = _case(torch.float32, seed=6)
    labels[0, :5] = -100  # prompt tokens under completion-only masking
    with _Ops() as ops:
        total, count = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
        (total / count.clamp(min=1)).backward()
    # boolean indexing dispatches to nonzero; .item()/int() to _local_scalar_dense
    syncing = {n for n in ops.names if any(k in n for k in ("nonzero", "_local_scalar_dense", "masked_select",
                                                                "unique"))}
    assert not syncing, syncing
    assert count.item() == (labels[:, 1:] != -100).sum().item()
