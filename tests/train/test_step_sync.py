"""The step's host syncs: unreported steps never read the device; a non-finite loss between reported
steps skips that update and every later one on the device, and the next reported step stops the run."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qdora.errors import QdoraError
from qdora.train.distributed import Dist
from qdora.train.optim import SpikeGuard
from qdora.train.step import train_step


class _Wrapper(nn.Module):
    """(loss_sum, count) like CausalLMLoss; `poison` makes the next loss NaN."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.poison = False

    def forward(self, input_ids, labels):
        loss = (self.w * input_ids.float().mean()).pow(2).sum()
        if self.poison:
            loss = loss * float("nan")
        return loss, torch.tensor(labels.numel())


class _Reads(TorchDispatchMode):
    """Counts device-to-host reads (.item(), int(), bool() of a tensor)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func.name() == "aten::_local_scalar_dense"
        return func(*args, **(kwargs or {}))


def _state(fused: bool):
    wrapper = _Wrapper()
    opt = torch.optim.AdamW(wrapper.parameters(), lr=0.1, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cfg = types.SimpleNamespace(offload_activations=False, lr=0.1, max_grad_norm=1.0, spike_factor=0.0,
                                on_spike="warn")  # clipping on: its norm must stay on the device too
    return types.SimpleNamespace(dist=Dist(), cfg=cfg, wrapper=wrapper, model=wrapper,
                                 trainable=list(wrapper.parameters()), spike=SpikeGuard(0.0), compute=torch.float32,
                                 scaler=None, optimizer=opt, scheduler=sched, step=0, last_checkpoint=None,
                                 first_nonfinite=None)


def _batch():
    return [{"input_ids": torch.arange(1, 9).reshape(1, 8), "labels": torch.arange(1, 9).reshape(1, 8)}]


def test_unreported_steps_do_not_read_the_device_and_nonfinite_skips_updates(monkeypatch):
    import qdora.train.step as step

    s = _state(fused=True)
    tokens = step.count_tokens(_batch())
    host_counts = step._global_counts(s.dist, *tokens)  # host ints and tensors only
    monkeypatch.setattr(step, "count_tokens", lambda batches: tokens)
    monkeypatch.setattr(step, "_global_counts", lambda d, trained, inputs: host_counts)
    with _Reads() as mode:  # (on a CPU every tensor is a host tensor: leave the host-side counting out)
        assert train_step(s, _batch(), report=False).loss is None
    assert mode.reads == 0  # the loss stays on the device
    after_first = s.wrapper.w.detach().clone()
    assert not torch.equal(after_first, torch.ones(4))
    s.wrapper.poison = True
    train_step(s, _batch(), report=False)  # step 2: NaN, skipped on the device
    s.wrapper.poison = False
    train_step(s, _batch(), report=False)  # step 3: finite, but skipped too (the run is already lost)
    assert torch.equal(s.wrapper.w.detach(), after_first)
    assert s.optimizer.state[s.wrapper.w]["step"].item() == 1
    with pytest.raises(QdoraError, match="at step 2: training stopped before that update"):
        train_step(s, _batch(), report=True)


def test_reported_steps_and_unfused_optimizers_check_at_once():
    s = _state(fused=False)  # no device-side skipping: every step reads its loss
    assert train_step(s, _batch(), report=False).loss > 0
    s.wrapper.poison = True
    before = s.wrapper.w.detach().clone()
    with pytest.raises(QdoraError, match="at step 2"):
        train_step(s, _batch(), report=False)
    assert torch.equal(s.wrapper.w.detach(), before)
