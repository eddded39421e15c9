"""One optimizer step and one evaluation: the numbers of training, in one place.

Loss: the decoder's final hidden states go through `qdora.train.loss.chunked_cross_entropy` with the lm_head
weight (never the full fp32 logits). Averaging is token-weighted over the whole optimizer step: every
micro batch of every rank contributes `loss_sum / N`, N = trained tokens of the step summed over micro
batches and ranks (counted from the labels before the forward). FSDP2 divides gradients by the world size
in its reduce-scatter, so the loss is multiplied by the world size (gloo has no PREMUL_SUM for a custom
divide factor). N ranks × micro_batch m thus train exactly like 1 process × N·m on the same rows.

After accumulation the gradients are clipped once to `--max-grad-norm` (their global norm, reduced over
ranks by torch for FSDP2's DTensor shards, is logged on reported steps). A non-finite loss or gradient norm
stops before the optimizer step (the weights stay those of the last good step); a loss spike
(`SpikeGuard`: above `--spike-factor` × the median of the last good steps) warns or stops, naming the step
and the last good checkpoint.

Host syncs: on a GPU the host must never wait for the device in the middle of a step (the GPU would idle
while the backward's launches are queued). Tokens are counted on the host batches before they are
copied (pinned, non-blocking), and summed over ranks with a host collective where the process group has
one (gloo); the loss has no `nonzero`. The loss and gradient norm reach the host only on reported steps
(logged, evaluated, saved, last: `report=True`), or every step when `--spike-factor` needs the loss. Between
them, with a fused AdamW, finiteness is checked on the device: a non-finite loss or norm sets the
optimizer's `found_inf`, so that update and every later one are skipped on the device, and the next
reported step stops the run with the step where it happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qdora.errors import QdoraError
from qdora.train.distributed import activation_offload, autocast
from qdora.train.loss import IGNORE_INDEX, LogitsTransform
from qdora.train.nf4_head_loss import lm_head_cross_entropy
from qdora.train.optim import clip_gradients
from qdora.train.router_loss import router_loss_of
from qdora.train.state import RunState


class CausalLMLoss(nn.Module):
    """Decoder → final hidden states → chunked cross-entropy against lm_head: the module FSDP2 wraps at the root.

    Being the root module lets FSDP2 gather the root parameters (embeddings, final norm, lm_head) in its
    forward, although the lm_head module itself is never called (only its weight is used).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.transform = LogitsTransform.from_config(lm.config)  # e.g. Gemma 2's final soft-capping
        self.router_loss = router_loss_of(lm)  # MoE: transformers' load-balancing term, its coefficient

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        if self.router_loss is None:
            hidden = self.lm.model(input_ids=input_ids, use_cache=False, **kw).last_hidden_state
            return lm_head_cross_entropy(hidden, self.lm.lm_head, labels, transform=self.transform)
        out = self.lm.model(input_ids=input_ids, use_cache=False, output_router_logits=True, **kw)
        loss_sum, count = lm_head_cross_entropy(out.last_hidden_state, self.lm.lm_head, labels,
                                                transform=self.transform)
        aux = self.router_loss(out.router_logits, kw.get("attention_mask"))
        return loss_sum + aux.to(loss_sum.dtype) * count.to(loss_sum.dtype), count


@dataclass
class StepResult:
    loss: float | None  # token-weighted mean over the global batch (None on a step that was not reported)
    lr: float  # the learning rate this step used
    input_tokens: int  # tokens read (padding excluded), all ranks: for tokens/s
    grad_norm: float | None = None  # global gradient norm before clipping (reported steps; all ranks)
    spike: str | None = None  # the warning, when this step's loss was a spike and --on-spike warn


def count_tokens(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(trained tokens, as the loss counts them after the causal shift; input tokens, padding excluded).
    Call it on the host batches: on device tensors every `int()` waits for the GPU."""
    trained = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batches)
    inputs = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in batches)
    return trained, inputs


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on the device; on CUDA through pinned memory without waiting for the copy."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _global_counts(d, trained: int, inputs: int) -> tuple[torch.Tensor, int]:
    """(trained tokens of all ranks as a tensor for the loss scaling, input tokens of all ranks as an int)."""
    counts = torch.tensor([trained, inputs], dtype=torch.float64)
    if d.host_collectives:  # gloo sums host tensors: the GPU is not involved
        d.all_reduce_sum(counts)
        return counts[0].clamp(min=1).to(d.device, non_blocking=True), int(counts[1])
    counts = d.all_reduce_sum(counts.to(d.device))
    return counts[0].clamp(min=1), int(counts[1].item())


def _skips_on_device(s: RunState) -> bool:
    """A fused torch AdamW without a grad scaler takes `found_inf`: it can skip an update on the device."""
    adam = isinstance(s.optimizer, (torch.optim.Adam, torch.optim.AdamW))
    return s.scaler is None and adam and bool(s.optimizer.defaults.get("fused"))


def _where(s: RunState) -> str:
    return f"the last good checkpoint is {s.last_checkpoint}" if s.last_checkpoint else \
        "no checkpoint was written yet (use --save-every)"


def _stop(s: RunState, loss: float, step: int, what: str | None = None) -> QdoraError:
    what = what or f"the loss became {loss}"
    return QdoraError(f"{what} at step {step}: training stopped before that update (later updates were "
                      f"skipped too); {_where(s)}. Try a lower --lr (now {s.cfg.lr}) or --dtype bf16/fp32")


def _check_spike(s: RunState, loss: float) -> str | None:
    """The warning for a loss spike (`SpikeGuard`), or None; raises with --on-spike stop."""
    cfg = s.cfg
    if not s.spike.is_spike(loss):
        s.spike.record(loss)
        return None
    spike = (f"loss spike at step {s.step + 1}: {loss:.4g} > {cfg.spike_factor:g} x the median "
             f"{s.spike.median():.4g} of the last {len(s.spike.history)} steps; {_where(s)}")
    if cfg.on_spike == "stop":
        raise QdoraError(f"{spike}. Training stopped before that update (--on-spike stop); lower --lr "
                         f"(now {cfg.lr}) or --max-grad-norm (now {cfg.max_grad_norm:g})")
    return spike


def check_deferred(s: RunState) -> None:
    """Raise if a step since the last reported one had a non-finite loss (one device read)."""
    if s.first_nonfinite is not None:
        first = int(s.first_nonfinite.item())
        if first:
            raise _stop(s, float("nan"), first, "the loss or the gradient norm became non-finite")


def train_step(s: RunState, batches: list[dict[str, torch.Tensor]], report: bool = True) -> StepResult:
    """Forward and backward over the micro batches (host batches) of one optimizer step, then the update;
    `s.step` += 1. `report=False` keeps the loss on the device where the optimizer can skip on it."""
    d, cfg = s.dist, s.cfg
    trained, inputs = count_tokens(batches)
    n_global, input_tokens = _global_counts(d, trained, inputs)
    loss_total = torch.zeros((), dtype=torch.float64, device=d.device)
    for i, batch in enumerate(batches):
        batch = to_device(batch, d.device)
        if d.sharded:  # reduce-scatter the gradients once, after the last micro batch
            s.wrapper.set_requires_gradient_sync(i == len(batches) - 1)
        with activation_offload(cfg.offload_activations, d.device), autocast(d.device, s.compute, d.sharded):
            loss_sum, _ = s.wrapper(**batch)
        scaled = loss_sum * (d.world_size / n_global.to(loss_sum.dtype))
        (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        loss_total += loss_sum.detach().double()
    loss_t = d.all_reduce_sum(loss_total) / n_global
    loss = norm = spike = None
    if report or not _skips_on_device(s) or cfg.spike_factor > 0:
        check_deferred(s)
        loss = loss_t.item()
        if not math.isfinite(loss):
            raise _stop(s, loss, s.step + 1)
        if s.scaler is not None:
            s.scaler.unscale_(s.optimizer)  # clip true gradients (inf/nan ones make the scaler skip the step)
        norm = clip_gradients(s.trainable, cfg.max_grad_norm).item()
        if not math.isfinite(norm) and s.scaler is None:
            raise _stop(s, loss, s.step + 1, f"the gradient norm became {norm}")
        spike = _check_spike(s, loss)
    else:  # the first non-finite step, kept on the device; from it on every update is skipped there
        norm_t = clip_gradients(s.trainable, cfg.max_grad_norm)
        if s.first_nonfinite is None:
            s.first_nonfinite = torch.zeros((), dtype=torch.int64, device=d.device)
        bad = ~torch.isfinite(loss_t) | ~torch.isfinite(norm_t.to(d.device))
        s.first_nonfinite = torch.where(bad & (s.first_nonfinite == 0), s.step + 1, s.first_nonfinite)
        s.optimizer.found_inf = (s.first_nonfinite > 0).float()
    lr = s.scheduler.get_last_lr()[0]
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    if hasattr(s.optimizer, "found_inf"):
        del s.optimizer.found_inf
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    return StepResult(loss, lr, input_tokens, norm, spike)


def evaluate(s: RunState) -> float:
    """Token-weighted mean loss over the eval rows (every rank its slice; the tail of a global batch dropped)."""
    d = s.dist
    s.wrapper.eval()
    s.eval_batches.load_state_dict({"epoch": 0, "position": 0})  # from the first eval batch again
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    with torch.no_grad():
        for batch in s.eval_batches:
            batch = {k: v.to(d.device) for k, v in batch.items()}
            with autocast(d.device, s.compute, d.sharded):
                loss_sum, count = s.wrapper(**batch)
            total += torch.stack([loss_sum.double(), count.double()])
    d.all_reduce_sum(total)
    s.wrapper.train()
    return (total[0] / total[1].clamp(min=1)).item()
