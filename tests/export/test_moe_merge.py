"""`qdora merge` of MoE adapters: every expert written back under the checkpoint's per-expert name, the
merged model (plain transformers) computing what the adapted NF4 model computes; PEFT's own
merge_and_unload of a LoRA expert adapter agrees."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from qdora.cli import main
from qdora.core.adapter_io import apply_adapter
from qdora.testing.adapters import make_adapter
from qdora.testing.tiny_models import build_tiny_model
from qdora.testing.tiny_moe import dequantized_reference

IDS = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _keys(d):
    with safe_open(d / "model.safetensors", "pt") as f:
        return set(f.keys())


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("family,tokenizer,method,target", [
    ("qwen3_moe", "qwen2", "dora", "all-linear,experts"),
    ("mixtral", "llama3", "dora", "experts.down_proj,q_proj"),
    ("qwen2_moe", "qwen2", "lora", "all-linear,experts"),
])
def test_cli_merge_writes_per_expert_tensors_and_reproduces_the_adapted_model(tmp_path, family, tokenizer,
                                                                              method, target):
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / family, family=family, tokenizer=tokenizer, seed=1, initializer_range=0.2)
    adapter = make_adapter(base, tmp_path / "adapter", method, target=target)
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["merge", "--adapter", str(adapter), "--output", str(out), "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    assert _keys(out) == _keys(base)  # the checkpoint's own names: block_sparse_moe.experts.3.w1 for Mixtral
    adapted = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    apply_adapter(adapted, adapter)
    want = _logits(adapted)
    got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_equals_peft_merge_and_unload_of_a_lora_expert_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qdora.export.merge import merge_adapter

    base = build_tiny_model(tmp_path / "q3", family="qwen3_moe", tokenizer="qwen2", seed=1, initializer_range=0.2)
    adapter = make_adapter(base, tmp_path / "adapter", "lora", target="q_proj,experts")
    res = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    assert res.merged == 2 + 2 * 4 * 3  # q_proj of 2 layers + 3 tensors per expert, 4 experts, 2 layers
    theirs = PeftModel.from_pretrained(dequantized_reference(base), adapter).merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            assert (p - q).abs().max() <= 1e-5 * max(q.abs().max(), 1), name
