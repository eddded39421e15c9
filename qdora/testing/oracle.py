"""PEFT as the oracle: the same NF4 base in a bitsandbytes `Linear4bit`, wrapped by PEFT's LoRA/DoRA.

Measured here (bitsandbytes 0.50.2, CPU with AVX512-BF16): a `Linear4bit` in eval mode whose input
does not require grad repacks its weight into a CPU-specific layout and switches to a bf16 inference
kernel whose outputs differ from the dequantize-then-matmul path by up to ~5% (relative). The oracle
turns that path off (`exact_bnb`) so it computes what training computes.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from qdora.core.layer import QDoRALinear


class OneLinear(nn.Module):
    """The smallest model PEFT can target: one Linear4bit called `proj`."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def bnb_linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
    """A bnb Linear4bit holding `weight` as NF4 with double quantization, blocksize 64 (CPU)."""
    out, inn = weight.shape
    lin = bnb.nn.Linear4bit(inn, out, bias=bias is not None, compute_dtype=compute_dtype,
                            compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    if bias is not None:
        lin.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return exact_bnb(lin.to("cpu"))


def peft_pair(
    out: int, inn: int, r: int, alpha: float, method: str, dtype: torch.dtype,
    bias: bool = False, rslora: bool = False, seed: int = 0,
):
    """(ours, peft_layer) on the same NF4 base with the same non-zero A, B and magnitude."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    b = torch.randn(out, generator=g) * 0.1 if bias else None
    lin = nn.Linear(inn, out, bias=bias)
    lin.weight.data.copy_(w)
    if bias:
        lin.bias.data.copy_(b)
    ours = QDoRALinear.from_linear(lin, r=r, alpha=alpha, method=method, rslora=rslora, adapter_dtype=dtype)
    base = OneLinear(bnb_linear4bit(w, b, dtype))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=method == "dora",
                     use_rslora=rslora, lora_dropout=0.0)
    pm = get_peft_model(base, cfg)
    layer = pm.base_model.model.proj
    a = torch.randn(r, inn, generator=g) * 0.1
    bb = torch.randn(out, r, generator=g) * 0.1
    with torch.no_grad():
        ours.lora_A.copy_(a)
        ours.lora_B.copy_(bb)
        layer.lora_A["default"].weight.data = a.to(dtype)
        layer.lora_B["default"].weight.data = bb.to(dtype)
        if method == "dora":
            m = ours.base.row_norm_sq.sqrt() * (1 + 0.1 * torch.randn(out, generator=g))
            ours.magnitude.copy_(m)
            layer.lora_magnitude_vector["default"].weight.data = m.to(dtype)
    return ours, pm, layer


def bnb_quantized_model(model_dir, dtype: torch.dtype = torch.float32):
    """The model as transformers + bitsandbytes load it in 4 bit (nf4, double quant): PEFT's base."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    return exact_bnb(
        AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map="cpu", dtype=dtype)
    )


def exact_bnb(model: nn.Module) -> nn.Module:
    """Keep every Linear4bit on bnb's dequantize+matmul path (no CPU bf16 inference kernel)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def oracle_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a bnb-quantized (PEFT) model, without gradients."""
    with torch.no_grad():
        return model(ids).logits
