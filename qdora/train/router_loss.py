"""The router's auxiliary load-balancing loss of an MoE model, as transformers computes it.

A transformers MoE causal LM adds `router_aux_loss_coef · load_balancing_loss_func(router_logits, E, k,
attention_mask)` to its language-model loss when asked for router logits. qdora's loss is a token sum
(the loop divides by the step's trained tokens), so the auxiliary term enters as `coef · aux · tokens`:
for one micro batch, loss_sum / tokens is exactly the model's own `labels=` loss with
`output_router_logits=True`. The router itself is frozen; the term still trains the adapters upstream
of it (their outputs are what the router sees). The function and coefficient are the model's own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterLoss:
    """The model's load-balancing function with its expert count, top-k and coefficient."""

    func: Callable
    num_experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.coef * self.func(router_logits, self.num_experts, self.top_k, attention_mask)


def router_loss_of(lm: nn.Module) -> RouterLoss | None:
    """The auxiliary loss a causal LM defines (transformers' `load_balancing_loss_func` in its modeling
    module, `router_aux_loss_coef` > 0), else None (dense models)."""
    func = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
    coef = float(getattr(lm, "router_aux_loss_coef", 0.0) or 0.0)
    if func is None or coef <= 0.0 or not hasattr(lm, "num_experts"):
        return None
    return RouterLoss(func, int(lm.num_experts), int(lm.num_experts_per_tok), coef)
