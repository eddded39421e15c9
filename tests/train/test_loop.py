"""`qdora train` end to end on a tiny model: CLI, outputs, falling loss, formats, and the saved adapter
loading (ours and PEFT's) into exactly the model that was trained."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner

from qdora.cli import main
from qdora.testing.runs import (
    alpaca_data,
    chat_data,
    metrics,
    small_config,
    text_data,
)
from qdora.train.config import option_fields
from qdora.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: one thread


@pytest.mark.slow
def test_cli_trains_alpaca_writes_outputs_and_keeps_last_checkpoints(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out),
            "--method", "dora", "--rank", "8", "--alpha", "16", "--lr", "5e-3", "--max-steps", "12",
            "--micro-batch", "4", "--seq-len", "128", "--completion-only", "--dtype", "fp32", "--device", "cpu",
            "--save-every", "4", "--keep", "1", "--scheduler", "constant", "--seed", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "adapter ready" in result.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "qdora_adapter.json", "metrics.jsonl",
                 "train_config.yaml"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-8"]
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp folders left
    ckpt = out / "checkpoint-8"
    for name in ("adapter_model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json",
                 "rng_state_0.json", "qdora_adapter.json"):
        assert (ckpt / name).is_file(), name
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"step", "loss", "lr", "tokens_per_s", "peak_mem_gb"} <= set(rows[0])
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.1, (first, last)
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["rank"] == 8 and saved["lr"] == 5e-3 and saved["completion_only"] is True


@pytest.mark.slow
def test_saved_adapter_reproduces_the_trained_model_in_qdora_and_peft(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qdora.core.adapter_io import apply_adapter
    from qdora.testing.oracle import bnb_quantized_model

    out = tmp_path / "run"
    result = train(small_config(tiny_llama_dir, alpaca_data(tmp_path), out, max_steps=5, lr=1e-2))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = result.model.eval()
    with torch.no_grad():
        expected = trained(ids, use_cache=False).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    apply_adapter(base, out)
    with torch.no_grad():
        ours = base(ids).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)

    peft_model = PeftModel.from_pretrained(bnb_quantized_model(tiny_llama_dir), str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    rel = ((theirs - expected).norm() / expected.norm()).item()
    assert rel < 1e-4, rel
    # the adapter moved the model: B is no longer zero
    with torch.no_grad():
        untrained = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(ids).logits
    assert (untrained - expected).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_chat_and_text_data_train(tiny_llama_dir, tmp_path, fmt):
    data = chat_data(tmp_path) if fmt == "chat" else text_data(tmp_path)
    out = tmp_path / "run"
    result = train(small_config(tiny_llama_dir, data, out, format=fmt, completion_only=fmt == "chat",
                                max_steps=3, method="lora", packing=fmt == "text"))
    assert result.status == "done" and result.step == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_eval_loss_is_logged(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    out = tmp_path / "run"
    train(small_config(tiny_llama_dir, data, out, eval_data=str(data), eval_every=2, max_steps=4))
    rows = metrics(out)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]


def test_yaml_config_with_flag_override_and_help(tiny_llama_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "data": str(alpaca_data(tmp_path)),
                                   "output": str(tmp_path / "run"), "max-steps": 2, "lr": 1e-3,
                                   "seq_len": 128, "dtype": "fp32", "rank": 4, "micro_batch": 2}))
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--lr", "2e-3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["lr"] == 2e-3 and saved["max_steps"] == 2 and saved["rank"] == 4

    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for f in option_fields():
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    assert "[default: dora]" in help_text and "torchrun --nproc_per_node" in help_text


@pytest.mark.slow
def test_checkpointing_and_activation_offload_do_not_change_the_numbers(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    runs = {}
    for name, kw in {"default": {}, "no_ckpt": {"gradient_checkpointing": False},
                     "offload": {"offload": "activations"}}.items():
        runs[name] = train(small_config(tiny_llama_dir, data, tmp_path / name, max_steps=2, **kw)).losses
    assert runs["no_ckpt"] == pytest.approx(runs["default"], rel=1e-6)
    assert runs["offload"] == pytest.approx(runs["default"], rel=1e-6)
