"""Adapters in PEFT format: PEFT loads ours with the same logits, and we load PEFT's."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qdora.core.adapt import AdapterSpec, adapt_model
from qdora.core.adapter_io import apply_adapter, read_adapter_config, save_adapter
from qdora.errors import QdoraError
from qdora.testing.adapters import trained_like
from qdora.testing.oracle import bnb_quantized_model, oracle_logits


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_peft_loads_our_adapter_with_the_same_logits(tiny_llama_dir, tmp_path, method):
    from peft import PeftModel

    model = load(tiny_llama_dir)
    spec = AdapterSpec(method=method, r=4, alpha=8, rslora=method == "lora", adapter_dtype="float32")
    adapt_model(model, spec)
    trained_like(model)
    out = save_adapter(model, tmp_path / "adapter", spec, base_model=str(tiny_llama_dir))
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector" in keys) == (method == "dora")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] == (method == "dora") and cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    own = json.loads((out / "qdora_adapter.json").read_text())  # qdora's record lives beside PEFT's config
    assert own["quant_type"] == "nf4" and own["adapter_dtype"] == "float32" and "qdora" not in cfg

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(bnb_quantized_model(tiny_llama_dir), out)
    unexpected = [str(w.message) for w in caught if "Unexpected keyword arguments" in str(w.message)]
    assert not unexpected, unexpected  # PEFT knows every key of our adapter_config.json
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ours = model(ids).logits
    theirs = oracle_logits(peft_model, ids)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4


def test_we_load_a_peft_made_dora_adapter(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = bnb_quantized_model(tiny_llama_dir)
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, use_dora=True,
                                         target_modules=["q_proj", "k_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    spec, _ = read_adapter_config(tmp_path / "peft")
    assert spec.method == "dora" and spec.r == 8 and sorted(spec.target) == ["down_proj", "k_proj", "q_proj"]
    model = load(tiny_llama_dir)
    apply_adapter(model, tmp_path / "peft")
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ours = model(ids).logits
    theirs = oracle_logits(pm, ids)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4


def test_round_trip_through_our_own_format(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir)
    spec = AdapterSpec(r=2, target=["o_proj"], adapter_dtype="float32")
    adapt_model(model, spec)
    trained_like(model, seed=3)
    save_adapter(model, tmp_path / "a", spec)
    again = load(tiny_llama_dir)
    spec2, _ = apply_adapter(again, tmp_path / "a")
    assert spec2.target == ["o_proj"] and spec2.adapter_dtype == "float32"
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)


def test_adapter_that_does_not_fit_is_a_clear_error(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir)
    spec = AdapterSpec(r=2, target=["o_proj"])
    adapt_model(model, spec)
    save_adapter(model, tmp_path / "a", spec)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["r"] = 3
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QdoraError, match="adapter shape"):
        apply_adapter(load(tiny_llama_dir), tmp_path / "a")


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(QdoraError, match="adapter_config.json is missing"):
        read_adapter_config(tmp_path)
