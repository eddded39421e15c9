"""Random-weight Llama models for benchmarks, built layer by layer so a 70B shape never exists in bf16.

The model is constructed on the meta device (buffers such as rotary frequencies stay real), the
embeddings, norms and lm_head are materialised on the target device with seeded random values, and each
decoder linear is generated on the device from a seed derived from its path, quantized to NF4 and freed
before the next one. Every method (qdora dora/lora, PEFT QDoRA/QLoRA) gets bit-identical NF4 bytes: both
quantize the same weight with bitsandbytes' nf4 / blocksize 64 / double quantization.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from qdora.core.adapt import (
    AdapterSpec,
    decoder_blocks,
    freeze_base,
    linear_names_in_blocks,
    make_layer,
    set_submodule,
)

METHODS = ("qdora-dora", "qdora-lora", "peft-qdora", "peft-qlora")


def _seeded(shape, seed: int, name: str, device, dtype, std: float) -> torch.Tensor:
    """A normal(0, std) tensor that depends only on (seed, name), generated directly on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def _meta_model(config, device, dtype):
    """The transformers model with parameters on meta and buffers (rotary inv_freq) on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    return model


def _fill_dense(model: nn.Module, skip: set[str], device, dtype, seed: int) -> None:
    """Materialise every meta parameter outside the decoder linears: norms = 1, the rest N(0, 0.02)."""
    for path, mod in model.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        for name, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            full = f"{path}.{name}" if path else name
            if "norm" in full:
                t = torch.ones(p.shape, device=device, dtype=dtype)
            else:
                t = _seeded(p.shape, seed, full, device, dtype, 0.02)
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def linear_weight(path: str, out_f: int, in_f: int, device, dtype, seed: int) -> torch.Tensor:
    """The random weight of one decoder linear (the same for every method)."""
    return _seeded((out_f, in_f), seed, path, device, dtype, 0.02)


def build_qdora(config, method: str, r: int, alpha: float, device, dtype, seed: int = 0,
                adapter_dtype: str = "float32") -> nn.Module:
    """qdora's model: every decoder linear a QDoRALinear (all-linear targets), one layer at a time."""
    model = _meta_model(config, device, dtype)
    spec = AdapterSpec(method=method, r=r, alpha=alpha, adapter_dtype=adapter_dtype)
    paths = linear_names_in_blocks(model)
    _fill_dense(model, set(paths), device, dtype, seed)
    for path in paths:
        meta = model.get_submodule(path)
        lin = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device=device,
                        dtype=dtype)
        lin.weight.data = linear_weight(path, meta.out_features, meta.in_features, device, dtype, seed)
        if lin.bias is not None:
            lin.bias.data.zero_()
        layer = make_layer(lin, spec)
        layer.reset_adapter(seed=zlib.crc32(path.encode()))
        set_submodule(model, path, layer)
        del lin
    freeze_base(model)
    decoder_blocks(model)  # refuse early if the family has no block list
    return model


def build_peft(config, method: str, r: int, alpha: float, device, dtype, seed: int = 0) -> nn.Module:
    """The PEFT baseline: bnb Linear4bit (nf4, double quant) bases wrapped by LoRA / DoRA (`use_dora`)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = _meta_model(config, device, dtype)
    paths = linear_names_in_blocks(model)
    _fill_dense(model, set(paths), device, dtype, seed)
    for path in paths:
        meta = model.get_submodule(path)
        lin = bnb.nn.Linear4bit(meta.in_features, meta.out_features, bias=meta.bias is not None,
                                compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                device="meta")
        w = linear_weight(path, meta.out_features, meta.in_features, device, dtype, seed)
        lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                       blocksize=64).to(device)
        if meta.bias is not None:
            lin.bias = nn.Parameter(torch.zeros(meta.out_features, device=device, dtype=dtype),
                                    requires_grad=False)
        lin.support_avx512bf16_for_cpu = False  # training path: dequantize + matmul, as on GPU
        set_submodule(model, path, lin)
        del w
    for p in model.parameters():
        p.requires_grad_(False)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=leaves, use_dora=method == "peft-qdora",
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def build(config, method: str, r: int, alpha: float, device, dtype, seed: int = 0) -> nn.Module:
    """One of METHODS on a fresh random-weight model (same base bytes for all)."""
    if method == "qdora-dora":
        model = build_qdora(config, "dora", r, alpha, device, dtype, seed)
    elif method == "qdora-lora":
        model = build_qdora(config, "lora", r, alpha, device, dtype, seed)
    elif method in ("peft-qdora", "peft-qlora"):
        model = build_peft(config, method, r, alpha, device, dtype, seed)
    else:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model
