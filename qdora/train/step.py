"""One optimizer step and one evaluation: the numbers of training, in one place.

Loss: the decoder's final hidden states go through `qdora.train.loss.chunked_cross_entropy` with the lm_head
weight (never the full fp32 logits). Averaging is token-weighted over the whole optimizer step: every
micro batch of every rank contributes `loss_sum / N`, N = trained tokens of the step summed over micro
batches and ranks (counted from the labels before the forward). FSDP2 divides gradients by the world size
in its reduce-scatter, so the loss is multiplied by the world size (gloo has no PREMUL_SUM for a custom
divide factor). N ranks × micro_batch m thus train exactly like 1 process × N·m on the same rows.

After accumulation the gradients are clipped once to `--max-grad-norm` (their global norm, reduced over
ranks by torch for FSDP2's DTensor shards, is returned and logged). A non-finite loss or gradient norm stops
before the optimizer step (the weights stay those of the last good step); a loss spike (`SpikeGuard`:
above `--spike-factor` × the median of the last good steps) warns or stops, naming the step and the last
good checkpoint.
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

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.model(input_ids=input_ids, use_cache=False, **kw).last_hidden_state
        return lm_head_cross_entropy(hidden, self.lm.lm_head, labels, transform=self.transform)


@dataclass
class StepResult:
    loss: float  # token-weighted mean over the global batch
    lr: float  # the learning rate this step used
    input_tokens: int  # tokens read (padding excluded), all ranks: for tokens/s
    grad_norm: float = 0.0  # global gradient norm before clipping (after accumulation, all ranks)
    spike: str | None = None  # the warning, when this step's loss was a spike and --on-spike warn


def count_tokens(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(trained tokens, as the loss counts them after the causal shift; input tokens, padding excluded)."""
    trained = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batches)
    inputs = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in batches)
    return trained, inputs


def train_step(s: RunState, batches: list[dict[str, torch.Tensor]]) -> StepResult:
    """Forward and backward over the micro batches of one optimizer step, then the update; `s.step` += 1."""
    d, cfg = s.dist, s.cfg
    trained, inputs = count_tokens(batches)
    counts = d.all_reduce_sum(torch.tensor([trained, inputs], dtype=torch.float64, device=d.device))
    n_global = counts[0].clamp(min=1)
    loss_total = torch.zeros((), dtype=torch.float64, device=d.device)
    for i, batch in enumerate(batches):
        if d.sharded:  # reduce-scatter the gradients once, after the last micro batch
            s.wrapper.set_requires_gradient_sync(i == len(batches) - 1)
        with activation_offload(cfg.offload_activations, d.device), autocast(d.device, s.compute, d.sharded):
            loss_sum, _ = s.wrapper(**batch)
        scaled = loss_sum * (d.world_size / n_global.to(loss_sum.dtype))
        (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        loss_total += loss_sum.detach().double()
    loss = (d.all_reduce_sum(loss_total) / n_global).item()
    where = f"the last good checkpoint is {s.last_checkpoint}" if s.last_checkpoint else \
        "no checkpoint was written yet (use --save-every)"
    if not math.isfinite(loss):
        raise QdoraError(f"the loss became {loss} at step {s.step + 1}: training stopped before that "
                         f"update; {where}. Try a lower --lr (now {cfg.lr}) or --dtype bf16/fp32")
    if s.scaler is not None:
        s.scaler.unscale_(s.optimizer)  # clip true gradients (inf/nan ones make the scaler skip the step)
    norm = clip_gradients(s.trainable, cfg.max_grad_norm).item()
    if not math.isfinite(norm) and s.scaler is None:
        raise QdoraError(f"the gradient norm became {norm} at step {s.step + 1} (loss {loss:.4g}): training "
                         f"stopped before that update; {where}. Try a lower --lr (now {cfg.lr})")
    spike = None
    if s.spike.is_spike(loss):
        spike = (f"loss spike at step {s.step + 1}: {loss:.4g} > {cfg.spike_factor:g} x the median "
                 f"{s.spike.median():.4g} of the last {len(s.spike.history)} steps; {where}")
        if cfg.on_spike == "stop":
            raise QdoraError(f"{spike}. Training stopped before that update (--on-spike stop); lower --lr "
                             f"(now {cfg.lr}) or --max-grad-norm (now {cfg.max_grad_norm:g})")
    else:
        s.spike.record(loss)
    lr = s.scheduler.get_last_lr()[0]
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    return StepResult(loss, lr, int(counts[1].item()), norm, spike)


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
