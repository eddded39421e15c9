"""Tiny mixture-of-experts configs (4 experts, top-2) for Qwen3-MoE, Mixtral and Qwen2-MoE.

Every expert's input size is a multiple of 64 (NF4 blocks never cross a row). `build_tiny_model(dir,
family="qwen3_moe")` writes one as transformers 5 saves it: one tensor per expert and projection.
"""

from __future__ import annotations

MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")


def tiny_moe_config(family: str, common: dict):
    """A transformers config of the MoE `family` from the dense tiny defaults in `common`."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    moe = dict(num_experts_per_tok=2, router_aux_loss_coef=0.01, output_router_logits=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**{**dict(num_experts=4, moe_intermediate_size=64, head_dim=16,
                                        norm_topk_prob=True), **moe, **common})
    if family == "mixtral":
        return MixtralConfig(**{**dict(num_local_experts=4, sliding_window=None), **moe, **common})
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**{**dict(num_experts=4, moe_intermediate_size=64,
                                        shared_expert_intermediate_size=128), **moe, **common})
    raise ValueError(f"unknown tiny MoE family {family!r}: choose {', '.join(MOE_FAMILIES)}")


def dequantized_reference(model_dir, dtype=None):
    """transformers' own model of `model_dir` with every weight qdora quantizes replaced by its NF4 round
    trip (block linears, and each expert's checkpoint tensors one by one): the oracle for qdora's
    NF4 model at init, routing included (the router stays in full precision in both)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qdora.core.adapt import linear_names_in_blocks
    from qdora.core.moe_families import moe_family_of
    from qdora.core.nf4 import nf4_from_weight

    def rt(w):
        return nf4_from_weight(w.detach().float()).dequantize(torch.float32).to(w.dtype)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32).eval()
    family = moe_family_of(model)
    with torch.no_grad():
        for path in linear_names_in_blocks(model):
            lin = model.get_submodule(path)
            lin.weight.copy_(rt(lin.weight))
        if family is not None:
            for module in model.modules():
                if type(module).__name__ != family.experts_class:
                    continue
                inter = module.gate_up_proj.shape[1] // 2
                for e in range(module.gate_up_proj.shape[0]):
                    module.gate_up_proj[e, :inter] = rt(module.gate_up_proj[e, :inter])
                    module.gate_up_proj[e, inter:] = rt(module.gate_up_proj[e, inter:])
                    module.down_proj[e] = rt(module.down_proj[e])
    return model
