"""`qdora plan` on MoE models: every expert counted resident in NF4, adapters per expert when `experts` is
targeted, activations from the routed experts only; checked against the real adapted model's tensors."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from qdora.cli import main
from qdora.core.adapt import AdapterSpec
from qdora.core.load import build_meta_model
from qdora.core.nf4 import NF4Weight
from qdora.testing.tiny_models import build_tiny_model
from qdora.tools.plan import load_config, nf4_bytes, plan_memory, shape_from_config


@pytest.mark.parametrize("family,tokenizer", [("qwen3_moe", "qwen2"), ("mixtral", "llama3"), ("qwen2_moe", "qwen2")])
@pytest.mark.parametrize("target", ["all-linear", "all-linear,experts", "experts.down_proj"])
def test_counts_equal_the_adapted_model(tmp_path, family, tokenizer, target):
    d = build_tiny_model(tmp_path / family, family=family, tokenizer=tokenizer)
    model, report = build_meta_model(d, AdapterSpec(r=4, target=target), torch.float32)
    plan = plan_memory(load_config(str(d)), rank=4, target=target, suggest=False)
    assert plan.details["adapter_params"] == report.trainable_params
    shardable = sum(nf4_bytes(*m.shape)[0] for m in model.modules() if isinstance(m, NF4Weight))
    assert plan.details["nf4_shardable_total"] == shardable  # experts and linears, all resident


def test_presets_and_routed_activations():
    q3 = shape_from_config(load_config("qwen3-30b-a3b"))
    assert (q3.experts.count, q3.experts.top_k, q3.experts.ff) == (128, 8, 768)
    plan = plan_memory(q3, gpus=2, gpu_mem_gib=24, target="all-linear,experts", suggest=False)
    e = plan.details["experts"]
    assert e["active_ff"] == 8 * 768 and 13.5 < e["nf4_bytes_total"] / 2**30 < 14.5  # ~29B expert weights
    dense_like = plan_memory(q3.__class__(**{**q3.__dict__, "experts": None}), gpus=2, suggest=False)
    assert plan.recompute < 2 * dense_like.recompute  # activations follow the k routed experts, not all E
    mx = shape_from_config(load_config("mixtral-8x7b"))
    assert (mx.experts.count, mx.experts.top_k, mx.experts.ff) == (8, 2, 14336)


def test_cli_reports_experts():
    res = CliRunner().invoke(main, ["plan", "--model", "mixtral-8x7b", "--gpus", "2", "--gpu-mem", "24"])
    assert res.exit_code == 0, res.output
    assert "8 per layer, all resident in NF4" in res.output and "2 routed per token" in res.output
