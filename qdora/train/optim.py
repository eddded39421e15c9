"""Optimizer choice, gradient clipping, and loss-spike detection: what keeps a long run on real models stable.

- `build_optimizer`: torch AdamW (fused kernels on CUDA, the multi-tensor path elsewhere) or bitsandbytes'
  8-bit AdamW (`adamw8bit`; `paged_adamw8bit` keeps its states in CUDA unified memory that pages to the host
  under pressure — on CPU bitsandbytes 0.50.2 runs it as plain 8-bit AdamW, which pages nothing, so that
  combination is allowed (and tested) but warned about). 8-bit AdamW keeps both moments in uint8 with a
  per-256 fp32 scale: 2 B/parameter instead of 8 (fp32) or 4 (bf16). Its states are plain tensors (uint8
  moments, fp32 scales and maps) that the checkpoint saves bit for bit like AdamW's. bitsandbytes steps
  plain tensors, not FSDP2's DTensor shards: the 8-bit optimizers are refused with several ranks.
- `clip_gradients`: the global L2 norm over every trainable gradient, once per optimizer step after
  accumulation, with `torch.nn.utils.clip_grad_norm_`; under FSDP2 the gradients are DTensor shards and
  torch reduces the norm across ranks, so every rank scales by the same factor and 2 ranks equal 1
  process. `max_norm == 0` only measures the norm.
- `SpikeGuard`: a step whose loss exceeds `factor` × the median of the last `window` losses (after
  `min_steps` steps) is a spike. Its history is part of the checkpoint so a resumed run judges the same.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable

import torch

from qdora.errors import QdoraError
from qdora.options import OPTIM

log = logging.getLogger("qdora.train.optim")


def build_optimizer(params: list[torch.Tensor], name: str, lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `--optim NAME` asks for, over `params` (already on their final device)."""
    if name == "adamw":
        kw = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    OPTIM.check(name)
    if name == "paged_adamw8bit" and device.type != "cuda":
        log.warning("--optim paged_adamw8bit pages optimizer states only on CUDA; on %s it is plain 8-bit AdamW",
                    device.type)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


BNB_NESTED = "__bnb_optimizer_quant_state__"  # bitsandbytes nests its per-parameter tensors under this key
BNB_PREFIX = "bnb."  # ... which a checkpoint stores flat, as `bnb.state1`, `bnb.absmax1`, ...


def is_bnb(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes")


def bnb_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A bitsandbytes optimizer's state keyed by parameter names, flat (tensors and plain values only), on
    the CPU: what a checkpoint writes as safetensors + JSON. (torch's distributed state-dict API cannot load
    bnb's nested per-parameter dict back; bnb optimizers only run unsharded, so none is needed.)"""
    sd = optimizer.state_dict()
    names = _param_names(model, optimizer)
    state = {}
    for index, values in sd["state"].items():
        flat = {}
        for key, value in values.items():
            if key == BNB_NESTED:
                flat.update({BNB_PREFIX + k: v for k, v in value.items()})
            else:
                flat[key] = value
        state[names[index]] = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in flat.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_bnb_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `bnb_state_dict` (bit-exact: the uint8 moments and fp32 scales are copied as they are)."""
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in names if n not in state["state"]]
    if missing:
        raise QdoraError(f"the checkpoint's optimizer state lacks {missing[:2]}: it is from another model/config")
    nested = {}
    for name, values in state["state"].items():
        inner = {k[len(BNB_PREFIX):]: v for k, v in values.items() if k.startswith(BNB_PREFIX)}
        outer = {k: v for k, v in values.items() if not k.startswith(BNB_PREFIX)}
        nested[index[name]] = {**outer, **({BNB_NESTED: inner} if inner else {})}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in state["param_groups"]]
    optimizer.load_state_dict({"state": nested, "param_groups": groups})


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def check_optimizer(name: str, device: torch.device, sharded: bool) -> None:
    """Refuse what cannot work before anything is loaded or written."""
    if name != "adamw" and sharded:
        raise QdoraError(f"--optim {name} (bitsandbytes) steps plain tensors, not FSDP2's sharded DTensor "
                         "parameters: use --optim adamw with several ranks or --offload params/all")


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (a local fp32 scalar tensor; all ranks agree under FSDP2)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return _local(torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None))


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global norm is at most `max_norm` (0: measure only); returns the norm
    before clipping."""
    if max_norm <= 0:
        return grad_norm(params)
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros((), dtype=torch.float32)
    return _local(torch.nn.utils.clip_grad_norm_(with_grad, max_norm, error_if_nonfinite=False))


def _local(norm: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).float()


class SpikeGuard:
    """Loss > factor × median(last `window` losses) is a spike; NaN/inf is always one."""

    def __init__(self, factor: float, window: int = 20, min_steps: int = 5):
        self.factor, self.window, self.min_steps = factor, window, min_steps
        self.history: list[float] = []

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if self.factor <= 0 or len(self.history) < self.min_steps:
            return False
        return loss > self.factor * statistics.median(self.history)

    def median(self) -> float | None:
        return statistics.median(self.history) if self.history else None

    def record(self, loss: float) -> None:
        """Remember a good step's loss (spikes are not recorded, so one spike does not raise the bar)."""
        self.history = (self.history + [float(loss)])[-self.window:]

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [float(x) for x in state.get("history", [])][-self.window:]
