"""`qdora train` on tiny Qwen3-MoE and Mixtral models through the real CLI: NF4 experts, adapters on
attention and (when named) the experts, transformers' routing and load-balancing loss; the saved adapter
rebuilds exactly the trained model, and gradient checkpointing does not change the numbers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from qdora.cli import main
from qdora.testing.runs import alpaca_data, metrics, small_config
from qdora.testing.tiny_models import build_tiny_model
from qdora.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("moe") / "qwen3_moe", family="qwen3_moe", tokenizer="qwen2",
                            seed=1, initializer_range=0.2)


def test_cli_trains_qwen3_moe_experts_and_the_adapter_rebuilds_the_trained_model(qwen3_moe_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qdora.core.adapter_io import apply_adapter

    out = tmp_path / "run"
    args = ["train", "--model", str(qwen3_moe_dir), "--data", str(alpaca_data(tmp_path)), "--output", str(out),
            "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--max-steps", "8", "--micro-batch", "4",
            "--seq-len", "128", "--dtype", "fp32", "--device", "cpu", "--target", "all-linear,experts",
            "--scheduler", "constant", "--log-every", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "gate_up_proj" in result.output and "down_proj" in result.output  # the adapted-layers summary
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.mlp.experts.lora_magnitude_vector" in keys

    # the same run in process: its in-memory model is what the adapter must rebuild
    run = train(small_config(qwen3_moe_dir, alpaca_data(tmp_path), tmp_path / "again", rank=4, alpha=8, lr=5e-3,
                             max_steps=8, micro_batch=4, target="all-linear,experts", scheduler="constant"))
    assert run.losses[max(run.losses)] == pytest.approx(losses[-1], rel=1e-6)
    base = AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.float32)
    apply_adapter(base, tmp_path / "again")
    ids = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = run.model.eval()(ids, use_cache=False).logits
        torch.testing.assert_close(base(ids).logits, expected, rtol=0, atol=1e-5)


def test_mixtral_lora_experts_only_and_checkpointing_keeps_the_numbers(tmp_path):
    d = build_tiny_model(tmp_path / "mixtral", family="mixtral", seed=1, initializer_range=0.2)
    data = alpaca_data(tmp_path)
    runs = {}
    for name, kw in {"ckpt": {}, "no_ckpt": {"gradient_checkpointing": False}}.items():
        runs[name] = train(small_config(d, data, tmp_path / name, max_steps=3, method="lora",
                                        target="experts", **kw)).losses
    assert runs["no_ckpt"] == pytest.approx(runs["ckpt"], rel=1e-6)
    cfg = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and len(cfg["target_parameters"]) == 2 and not cfg["use_dora"]


def test_resume_of_an_moe_run_repeats_its_steps_exactly(qwen3_moe_dir, tmp_path):
    data = alpaca_data(tmp_path)
    kw = dict(max_steps=4, micro_batch=2, target="all-linear,experts", save_every=2, keep=0)
    full = train(small_config(qwen3_moe_dir, data, tmp_path / "full", **kw))
    resumed = train(small_config(qwen3_moe_dir, data, tmp_path / "resumed",
                                 resume=str(tmp_path / "full" / "checkpoint-2"), **kw))
    assert {s: resumed.losses[s] for s in (3, 4)} == {s: full.losses[s] for s in (3, 4)}
