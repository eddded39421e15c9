"""The mixture-of-experts terms of `qdora plan`: every expert resident in NF4, only the routed ones active.

All E experts of a layer are stored (NF4, sharded like any block weight) whatever the routing, so the base
grows with E; the activations a layer saves grow with the k experts each token is routed to (plus a shared
expert, Qwen2-MoE), not with E. The router (E×H) stays in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experts:
    """A sparse layer: E experts of FFN size `ff`, k routed per token, an optional shared expert."""

    count: int
    top_k: int
    ff: int
    shared_ff: int = 0

    def weights(self, hidden: int) -> list[tuple[int, int]]:
        """(out, in) of every expert weight of one layer, as qdora quantizes them (one per checkpoint tensor)."""
        return [(self.ff, hidden), (self.ff, hidden), (hidden, self.ff)] * self.count

    def fused(self, hidden: int) -> dict[str, tuple[int, int]]:
        """(out, in) of one expert's slice of each fused parameter `--target experts` adapts."""
        return {"gate_up_proj": (2 * self.ff, hidden), "down_proj": (hidden, self.ff)}

    def active_ff(self) -> int:
        """FFN width a token's activations go through: k routed experts plus the shared one."""
        return self.top_k * self.ff + self.shared_ff


def experts_from_config(d: dict) -> Experts | None:
    """The MoE settings of a (text) config dict, None for a dense model."""
    count = d.get("num_local_experts") or d.get("num_experts")
    if not isinstance(count, int) or count < 2:
        return None
    ff = d.get("moe_intermediate_size") or d["intermediate_size"]
    return Experts(count, int(d.get("num_experts_per_tok", 2)), int(ff),
                   int(d.get("shared_expert_intermediate_size") or 0))
