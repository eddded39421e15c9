"""Expert adapters in PEFT's `target_parameters` format (LoRA on transformers' fused 3-D expert weights).

PEFT wraps each targeted parameter of an experts module in a `ParamWrapper`, nesting them in the module's
parameter order (gate_up_proj inside, down_proj outside), so its keys are positional:

    <path>.experts.base_layer.lora_A.weight   gate_up_proj, when down_proj is targeted too
    <path>.experts.lora_A.weight              the outermost targeted parameter

and its tensors are flat: lora_A [E·r, in] (expert-major rows), lora_B [out, r·E] (column j·E + e is
rank j of expert e). qdora keeps A [E, r, in], B [E, out, r] and converts here, both ways. PEFT has no
DoRA for expert parameters; qdora writes the per-expert magnitude [E, out] as `lora_magnitude_vector`
beside the same prefix (PEFT refuses to load a DoRA expert adapter; qdora merges it).
"""

from __future__ import annotations

import re

import torch

from qdora.core.moe_families import EXPERT_PARAMS

PEFT_EXPERT_KEY = re.compile(r"^(?P<experts>.*\.experts)(?P<nest>(?:\.base_layer)*)\."
                  r"(?P<attr>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_ATTR = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}
_SUFFIX = {v: k for k, v in _ATTR.items()}


def split_expert_path(path: str) -> tuple[str, str] | None:
    """`model.layers.0.mlp.experts.gate_up_proj` -> (`model.layers.0.mlp.experts`, `gate_up_proj`); else None."""
    parent, _, leaf = path.rpartition(".")
    if leaf in EXPERT_PARAMS and parent.rsplit(".", 1)[-1] == "experts":
        return parent, leaf
    return None


def _nesting(param: str, targeted: set[str]) -> str:
    order = [p for p in EXPERT_PARAMS if p in targeted]
    return ".base_layer" * (len(order) - 1 - order.index(param))


def to_peft_layout(attr: str, t: torch.Tensor) -> torch.Tensor:
    if attr == "lora_A":  # [E, r, in] -> [E·r, in]
        return t.reshape(-1, t.shape[-1]).contiguous()
    if attr == "lora_B":  # [E, out, r] -> [out, r·E]
        return t.permute(1, 2, 0).reshape(t.shape[1], -1).contiguous()
    return t.contiguous()


def from_peft_layout(attr: str, t: torch.Tensor, r: int) -> torch.Tensor:
    if attr == "lora_A":
        return t.reshape(-1, r, t.shape[-1])
    if attr == "lora_B":
        return t.reshape(t.shape[0], r, -1).permute(2, 0, 1).contiguous()
    return t


def expert_peft_keys(paths_attrs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """PEFT key body (no `base_model.model.` prefix) for every expert (path, attr) in one adapter."""
    targeted: dict[str, set[str]] = {}
    for path, _ in paths_attrs:
        experts, param = split_expert_path(path)
        targeted.setdefault(experts, set()).add(param)
    out = {}
    for path, attr in paths_attrs:
        experts, param = split_expert_path(path)
        out[(path, attr)] = f"{experts}{_nesting(param, targeted[experts])}.{_SUFFIX[attr]}"
    return out


def target_parameters(paths: list[str]) -> list[str]:
    """adapter_config.json's `target_parameters`: `mlp.experts.gate_up_proj`-style suffixes, in PEFT's order."""
    names = set()
    for path in paths:
        experts, param = split_expert_path(path)
        names.add((experts.rsplit(".", 2)[-2:][0] + ".experts", param))
    return [f"{e}.{p}" for p in EXPERT_PARAMS for e in sorted({e for e, q in names if q == p})]


def parse_expert_key(body: str, targeted: list[str]) -> tuple[str, str] | None:
    """(module path, attr) of a PEFT expert key body, given the config's targeted parameter names."""
    m = PEFT_EXPERT_KEY.match(body)
    if m is None or not targeted:
        return None
    order = [p for p in EXPERT_PARAMS if p in targeted]
    depth = m.group("nest").count(".base_layer")
    if depth >= len(order):
        return None
    param = order[len(order) - 1 - depth]
    return f"{m.group('experts')}.{param}", _ATTR[m.group("attr")]
