"""Causal-LM cross-entropy against a frozen NF4 lm_head, walking the vocabulary in slices.

The dense chunked loss (qdora/train/loss.py) walks tokens and needs the whole head for each chunk. With
an NF4 head that would mean a whole dequantized [vocab, hidden] matrix (2 GiB at 70B). Here the loop is
over vocabulary slices instead: each slice is dequantized once (`qdora.core.nf4_head.dequantize_rows`),
multiplied with all tokens' hidden states, and folded into a running (max, sum-exp) per token: an online
log-sum-exp. The backward walks the slices again (one more dequantization of the head) and accumulates
the input gradient in fp32. Peak extra memory: a few fp32 [tokens, slice] logits copies plus one
[slice, hidden] dequantized slice (qdora.tools.plan.nf4_head_loss_bytes).

Every position is computed and ignored ones are masked out (no `nonzero`, so no host synchronisation).
The weight is frozen: no gradient to it. Against the dense chunked loss on the dequantized weight the
result differs only by fp32 rounding of the online log-sum-exp (tests/train/test_nf4_head_loss.py).
"""

from __future__ import annotations

import torch

from qdora.core.layer import NF4Linear, compute_dtype
from qdora.core.nf4_head import dequantize_rows, row_alignment
from qdora.data.formats import IGNORE_INDEX
from qdora.train.loss import IDENTITY, LogitsTransform, chunked_cross_entropy, shifted_targets

VOCAB_SLICE = 8192  # = qdora.tools.plan.NF4_HEAD_VOCAB_SLICE


def _slices(vocab: int, size: int, align: int):
    size = max(align, size // align * align)
    for start in range(0, vocab, size):
        yield start, min(start + size, vocab)


class _NF4HeadCrossEntropy(torch.autograd.Function):
    """Sum over masked tokens of (log-sum-exp of logits − target logit); gradient only to `hidden`."""

    @staticmethod
    def forward(ctx, hidden, targets, mask, packed, absmax, absmax2, code2, offset, code, spec, vocab_slice,
                transform):
        t = hidden.shape[0]
        m = torch.full((t,), float("-inf"), dtype=torch.float32, device=hidden.device)
        s = torch.zeros(t, dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(t, dtype=torch.float32, device=hidden.device)
        stats = (packed, absmax, absmax2, code2, offset, code)
        for v0, v1 in _slices(spec.out_features, vocab_slice, row_alignment(spec)):
            w = dequantize_rows(*stats, spec, v0, v1, hidden.dtype)
            logits = transform((hidden @ w.t()).float())
            del w
            new_m = torch.maximum(m, logits.amax(dim=1))
            s = s * torch.exp(m - new_m) + torch.exp(logits - new_m[:, None]).sum(dim=1)
            m = new_m
            inside = (targets >= v0) & (targets < v1)
            local = (targets - v0).clamp(0, v1 - v0 - 1)
            target_logit += torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), 0.0)
            del logits
        lse = m + torch.log(s)
        total = ((lse - target_logit) * mask).sum()
        ctx.save_for_backward(hidden, targets, mask, lse, *stats)
        ctx.spec, ctx.vocab_slice, ctx.transform = spec, vocab_slice, transform
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, targets, mask, lse, *stats = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 12
        spec = ctx.spec
        weight = mask * grad_total.float()  # d total / d (lse_t − logit_t)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for v0, v1 in _slices(spec.out_features, ctx.vocab_slice, row_alignment(spec)):
            w = dequantize_rows(*stats, spec, v0, v1, hidden.dtype)
            # d(lse − z_target)/dz = softmax(z) − onehot(target), z = transform(logits)
            z = ctx.transform((hidden @ w.t()).float())
            probs = torch.exp(z - lse[:, None])
            inside = (targets >= v0) & (targets < v1)
            local = (targets - v0).clamp(0, v1 - v0 - 1)
            probs.scatter_add_(1, local[:, None], -inside.float()[:, None])
            dz = probs * weight[:, None]
            del probs
            dlogits = (dz if ctx.transform.identity else ctx.transform.backward(z, dz)).to(hidden.dtype)
            del z, dz
            grad_h += dlogits @ w
            del w, dlogits
        return (grad_h.to(hidden.dtype),) + (None,) * 11


def nf4_head_cross_entropy(
    hidden: torch.Tensor,
    head: NF4Linear,
    labels: torch.Tensor,
    vocab_slice: int = VOCAB_SLICE,
    ignore_index: int = IGNORE_INDEX,
    transform: LogitsTransform = IDENTITY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss_sum, token_count)` like `qdora.train.loss.chunked_cross_entropy`, for an NF4 lm_head
    (`transform`: the family's logit scale / soft-cap, as there).

    hidden `[..., seq, hidden]` (after the final norm), labels `[..., seq]` unshifted (shifted here). The
    logits matmul runs in the compute dtype (autocast's, else hidden's); softmax and sums in fp32.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    if vocab_slice < 1:
        raise ValueError(f"vocab_slice must be positive, got {vocab_slice}")
    dtype = compute_dtype(hidden)
    targets = shifted_targets(labels, ignore_index)
    keep = targets != ignore_index
    flat = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    b = head.base
    with torch.autocast(hidden.device.type, enabled=False):
        total = _NF4HeadCrossEntropy.apply(flat, targets, keep.float(), b.packed, b.absmax, b.absmax2, b.code2,
                                           b.offset, b.code, b.spec, vocab_slice, transform)
    return total, keep.sum()


def lm_head_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                          transform: LogitsTransform = IDENTITY) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss for whichever lm_head the model has: NF4 (vocab slices) or dense (token chunks)."""
    if isinstance(head, NF4Linear):
        return nf4_head_cross_entropy(hidden, head, labels, transform=transform)
    return chunked_cross_entropy(hidden, head.weight, labels, transform=transform)
