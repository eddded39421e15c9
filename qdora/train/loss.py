"""Chunked causal-LM cross-entropy from hidden states and the lm_head weight.

The full logits of one 2048-token sequence against a 128k vocabulary take 1 GB in fp32 (docs/design.md,
"The 70B memory budget").
This loss never builds them: it walks the non-ignored tokens in chunks of `chunk_size`, computes each
chunk's logits in the compute dtype, takes an fp32 log-softmax, and keeps only one fp32 log-sum-exp per
token. The backward recomputes each chunk's logits, so the extra peak memory is O(chunk_size × vocab)
(plus the fp32 lm_head gradient accumulator, only when the weight requires grad).

The logits matmul runs in the lm_head weight's dtype (hidden states are cast to it; autocast is switched
off inside so forward and backward agree); softmax, log-sum-exp and the loss are fp32.

Whatever a family applies to the logits after the lm_head (Gemma 2's `final_logit_softcapping`, a
constant logit scale) is a `LogitsTransform`, applied to each chunk in fp32 and differentiated in the
backward, so qdora trains the function the model runs (`LogitsTransform.from_config`).

Labels are shifted inside: hidden state t predicts labels[t + 1], as transformers' causal LMs do.
Tokens labelled `ignore_index` are masked, not dropped: nothing here waits for the device (no `nonzero`,
no count on the host), at the price of computing their logits too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qdora.data.formats import IGNORE_INDEX


@dataclass(frozen=True)
class LogitsTransform:
    """z = cap · tanh(scale · logits / cap) (or scale · logits without a cap), elementwise, in fp32.

    `scale`: Cohere's `logit_scale`, Granite's 1 / `logits_scaling`; `softcap`: Gemma 2's (and Gemma 3's
    when set) `final_logit_softcapping`. The identity transform costs nothing.
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def backward(self, transformed: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """d loss / d logits from d loss / d z, using the transformed values z (no second tanh)."""
        if self.softcap is not None:
            grad = grad * (1.0 - (transformed / self.softcap) ** 2)
        if self.scale != 1.0:
            grad = grad * self.scale
        return grad

    @classmethod
    def from_config(cls, config: Any) -> LogitsTransform:
        """The transform a transformers config implies (its text config for multimodal checkpoints)."""
        config = getattr(config, "text_config", None) or config
        get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
        scale = 1.0
        if get("logit_scale") is not None:  # Cohere: logits * logit_scale
            scale *= float(get("logit_scale"))
        if get("logits_scaling") is not None:  # Granite: logits / logits_scaling
            scale /= float(get("logits_scaling"))
        cap = get("final_logit_softcapping")
        return cls(scale=scale, softcap=float(cap) if cap else None)


IDENTITY = LogitsTransform()


def shifted_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Targets aligned with hidden states: position t is trained to predict labels[t + 1]."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1).reshape(-1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies over the rows of `hidden` where `mask` (fp32 0/1) is 1, logits recomputed
    per chunk. Masked-out rows must be finite (the caller zeroes them): they add 0 and get no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                chunk_size: int, transform: LogitsTransform):
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedCrossEntropy._forward(ctx, hidden, weight, targets, mask, chunk_size, transform)

    @staticmethod
    def _forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                 chunk_size: int, transform: LogitsTransform):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits = transform((hidden[start:stop] @ weight.t()).float())
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
            lse[start:stop] = chunk_lse
            total += ((chunk_lse - target_logit) * mask[start:stop]).sum()
            del logits
        ctx.save_for_backward(hidden, weight, targets, mask, lse)
        ctx.chunk_size = chunk_size
        ctx.transform = transform
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        with torch.autocast(grad_total.device.type, enabled=False):
            return _ChunkedCrossEntropy._backward(ctx, grad_total)

    @staticmethod
    def _backward(ctx, grad_total: torch.Tensor):
        hidden, weight, targets, mask, lse = ctx.saved_tensors
        chunk_size, transform = ctx.chunk_size, ctx.transform
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g = grad_total.float()
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:stop]
            # d(lse - logit_target)/d logits = softmax - onehot(target)
            z = transform((h @ weight.t()).float())
            probs = torch.exp(z - lse[start:stop, None])
            probs[torch.arange(stop - start, device=probs.device), targets[start:stop]] -= 1.0
            dz = probs * (mask[start:stop] * g)[:, None]  # masked rows: no gradient
            del probs
            dlogits = (dz if transform.identity else transform.backward(z, dz)).to(hidden.dtype)
            del z, dz
            if need_h:
                grad_h[start:stop] = dlogits @ weight
            if need_w:
                grad_w.addmm_(dlogits.t().float(), h.float())
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    transform: LogitsTransform = IDENTITY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM cross-entropy, returned as `(loss_sum, token_count)`.

    hidden: `[..., seq, hidden]` final hidden states (after the final norm);
    weight: lm_head `[vocab, hidden]`;
    labels: `[..., seq]` unshifted labels (shifted here), `ignore_index` where no loss is wanted.
    transform: what the family applies to the logits after the lm_head (see `LogitsTransform`);
    `loss_sum` is an fp32 scalar (differentiable w.r.t. hidden and weight); `token_count` an int64 scalar.
    Divide the sum over micro batches and ranks by the summed count for a token-weighted mean.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    targets = shifted_targets(labels, ignore_index).to(hidden.device)
    keep = targets != ignore_index
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.dtype != weight.dtype:  # the lm_head's dtype is the compute dtype (autocast is off inside)
        flat = flat.to(weight.dtype)
    # Ignored rows are zeroed, not dropped: dropping needs their count on the host (a device sync every
    # micro step); zeroed rows give finite logits even if the hidden states there hold inf/nan, add 0, and
    # pass no gradient back. A batch with no targets still runs the same backward (every rank does).
    flat = torch.where(keep[:, None], flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    total = _ChunkedCrossEntropy.apply(flat, weight, targets.masked_fill(~keep, 0), keep.float(), chunk_size,
                                       transform)
    return total, keep.sum()


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    transform: LogitsTransform = IDENTITY,
) -> torch.Tensor:
    """Mean over non-ignored tokens (0 when there are none): the single-process convenience form."""
    total, count = chunked_cross_entropy(hidden, weight, labels, chunk_size, ignore_index, transform)
    return total / count.clamp(min=1).to(total.device)
