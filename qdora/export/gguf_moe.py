"""Mixture-of-experts in GGUF, as llama.cpp's converter writes Qwen3-MoE, Qwen2-MoE and Mixtral.

Checkpoints keep one tensor per expert (`mlp.experts.3.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.3.w1.weight`); llama.cpp wants each layer's experts stacked into one 3-D tensor
per projection (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`, expert-major), the router as
`ffn_gate_inp` (kept F32, as the converter keeps it), and the expert count, experts used per token and
expert FFN size in the metadata. Stacking is done while writing, one expert at a time (see
`gguf_tensors.write_tensor_data`): the stacked layer never sits in memory.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import gguf

from qdora.errors import QdoraError

if TYPE_CHECKING:
    from qdora.export.gguf_config import ModelSpec

_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<w>\w+)\.weight$")


def expert_stacks(names: list[str]) -> dict[str, list[str]]:
    """Stacked HF name (`model.layers.0.mlp.experts.gate_proj.weight`, as the converter names it before
    mapping) -> the per-expert checkpoint names in expert order."""
    groups: dict[str, dict[int, str]] = {}
    for name in names:
        m = _EXPERT.match(name)
        if m:
            groups.setdefault(f"{m.group('prefix')}.{m.group('w')}.weight", {})[int(m.group("e"))] = name
    stacks = {}
    for stack, by_expert in groups.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise QdoraError(f"the checkpoint's experts for {stack} are not numbered 0..{len(by_expert) - 1}")
        stacks[stack] = [by_expert[e] for e in range(len(by_expert))]
    return stacks


def is_router(gguf_name: str) -> bool:
    """`blk.N.ffn_gate_inp.weight`: the router, which llama.cpp's converter always writes in F32."""
    return re.fullmatch(r"blk\.\d+\.ffn_gate_inp\.weight", gguf_name) is not None


def moe_hparams(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    """The converter's MoE keys: expert count (`num_local_experts` / `num_experts`), experts used per token,
    the expert and shared-expert FFN sizes where the config has them."""
    cfg = spec.cfg
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if not n_experts:
        return
    writer.add_expert_count(int(n_experts))
    writer.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    if cfg.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    if cfg.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))


def check_moe(spec: ModelSpec) -> None:
    """Refuse what llama.cpp's MoE graphs cannot run: it normalises the top-k weights for qwen3moe and
    Mixtral and not for qwen2moe, and makes every layer sparse."""
    cfg = spec.cfg
    if not (cfg.get("num_local_experts") or cfg.get("num_experts")):
        return
    norm = {"qwen3_moe": True, "qwen2_moe": False, "mixtral": True}.get(spec.model_type)
    if spec.model_type != "mixtral" and norm is not None and bool(cfg.get("norm_topk_prob", False)) != norm:
        raise QdoraError(f"norm_topk_prob={cfg.get('norm_topk_prob')} is not what llama.cpp's {spec.arch} "
                         f"computes (it {'always' if norm else 'never'} renormalises the top-k weights)")
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1) or 1) != 1:
        raise QdoraError("dense layers between the sparse ones (mlp_only_layers / decoder_sparse_step) are not "
                         f"supported by llama.cpp's {spec.arch}")
