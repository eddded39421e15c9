"""The mixture-of-experts families qdora handles, and how their checkpoints name the experts.

transformers 5 keeps a layer's experts fused in 3-D parameters (`experts.gate_up_proj` [E, 2I, H] =
gate rows then up rows, `experts.down_proj` [E, H, I]); checkpoints on the Hub keep one tensor per
expert and projection. qdora quantizes each checkpoint tensor on its own (so merge can redo exactly that
round trip one tensor at a time) and stores it under the checkpoint's own per-expert name inside
`NF4Experts`; this table says what those names are for each family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qdora.core.families import Family, register
from qdora.errors import QdoraError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class MoEFamily:
    """One family: its experts module, per-expert checkpoint names, config keys and llama.cpp arch."""

    model_type: str
    experts_class: str  # transformers' fused experts module
    gate: str  # checkpoint name of an expert's gate projection (first half of gate_up_proj)
    up: str  # ... up projection (second half of gate_up_proj)
    down: str  # ... down projection
    num_experts_key: str  # config key of the expert count
    expert_ff_key: str  # config key of one expert's intermediate size
    # model-path fragment -> checkpoint fragment (Mixtral's checkpoints say block_sparse_moe, the model mlp)
    renames: tuple[tuple[str, str], ...] = ()
    # block linears that stay in full precision and frozen (gates, not weights)
    keep_linears: tuple[str, ...] = ()
    shared_expert: bool = False

    @property
    def parts(self) -> dict[str, tuple[str, ...]]:
        """Fused parameter -> the per-expert checkpoint names it is made of, in row order."""
        return {"gate_up_proj": (self.gate, self.up), "down_proj": (self.down,)}

    def to_checkpoint(self, key: str) -> str:
        for model_part, ckpt_part in self.renames:
            key = key.replace(model_part, ckpt_part)
        return key

    def to_model(self, key: str) -> str:
        for model_part, ckpt_part in self.renames:
            key = key.replace(ckpt_part, model_part)
        return key


FAMILIES: dict[str, MoEFamily] = {
    "qwen3_moe": MoEFamily("qwen3_moe", "Qwen3MoeExperts", "gate_proj", "up_proj", "down_proj",
                           "num_experts", "moe_intermediate_size"),
    "qwen2_moe": MoEFamily("qwen2_moe", "Qwen2MoeExperts", "gate_proj", "up_proj", "down_proj",
                           "num_experts", "moe_intermediate_size", keep_linears=("shared_expert_gate",),
                           shared_expert=True),
    "mixtral": MoEFamily("mixtral", "MixtralExperts", "w1", "w3", "w2", "num_local_experts",
                         "intermediate_size", renames=((".mlp.", ".block_sparse_moe."),)),
}

# llama.cpp's architectures, as its converter writes them: Mixtral is the llama arch with experts.
register(Family("qwen3_moe", "Qwen3-MoE", gguf_arch="qwen3moe", chat_formats=("chatml",)))
register(Family("mixtral", "Mixtral", gguf_arch="llama", chat_formats=("inst",)))
register(Family("qwen2_moe", "Qwen2-MoE (Qwen1.5-MoE)", gguf_arch="qwen2moe", chat_formats=("chatml",)))

# Fused parameters of the experts module in registration order (PEFT nests its wrappers in this order).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def moe_family_of(model: nn.Module) -> MoEFamily | None:
    """The MoE family of a transformers model, None for a dense model; other MoE models are refused."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for name, p in model.named_parameters():
        if p.dim() == 3:
            raise QdoraError(
                f"{type(model).__name__} ({model_type}) is a mixture-of-experts model qdora does not support "
                f"(fused expert weights such as {name}); supported MoE families: {', '.join(sorted(FAMILIES))}")
    return None

