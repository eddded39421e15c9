"""Pre-quantized checkpoints written by transformers + bitsandbytes themselves, as `*-bnb-4bit` repos are.

`write_bnb_checkpoint` loads a full-precision model folder with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", ...)` and `save_pretrained`s it: the packed bytes and quant-state companions
in the file are exactly what bitsandbytes produced on this machine. The tokenizer files are copied along.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def bnb_config(double_quant: bool = True, compute_dtype: torch.dtype = torch.float32):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_bnb_model(model_dir: str | Path, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32):
    """transformers' 4-bit model of a full-precision folder (quantized on load) or of a pre-quantized one."""
    from transformers import AutoModelForCausalLM

    kw = {} if (Path(model_dir) / "config.json").read_text().find("quantization_config") >= 0 else \
        {"quantization_config": bnb_config(double_quant, compute_dtype)}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), device_map="cpu", dtype=compute_dtype, **kw)


def write_bnb_checkpoint(src: str | Path, out: str | Path, double_quant: bool = True,
                         compute_dtype: torch.dtype = torch.float32) -> Path:
    """Quantize `src` to NF4 with transformers + bitsandbytes and save it pre-quantized to `out`."""
    out = Path(out)
    model = load_bnb_model(src, double_quant, compute_dtype)
    model.save_pretrained(out)
    for f in Path(src).iterdir():
        if f.is_file() and not (out / f.name).exists() and f.name.startswith(("tokenizer", "special_tokens",
                                                                                "chat_template")):
            shutil.copy2(f, out / f.name)
    return out
