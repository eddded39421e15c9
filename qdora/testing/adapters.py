"""Adapters that look trained (non-zero B, moved magnitudes), saved in PEFT format: inputs for the merge,
export and analysis tests without running a training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qdora.core.adapt import AdapterSpec, adapt_model, adapter_layers
from qdora.core.adapter_io import save_adapter


def trained_like(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter non-trivial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
            if layer.magnitude is not None:
                layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))


def make_adapter(base_dir: Path, out: Path, method: str, target: str | list[str] = "all-linear",
                 seed: int = 0) -> Path:
    """A trained-looking r=4 adapter of `method` for the fp32 model in `base_dir`, saved to `out`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    spec = AdapterSpec(method=method, r=4, alpha=8, rslora=method == "lora", target=target, adapter_dtype="float32")
    adapt_model(model, spec)
    trained_like(model, seed)
    save_adapter(model, out, spec, base_model=str(base_dir))
    return out
