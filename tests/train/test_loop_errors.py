"""Bad input to `qdora train`: one clear message, exit code != 0, and no output folder debris."""

from __future__ import annotations

import shutil
import sys

import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.testing.runs import (
    alpaca_data,
    write_jsonl,
)
from qdora.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: one thread


def run(model, data, out, *extra):
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "2",
            "--seq-len", "128", "--rank", "4", "--dtype", "fp32", "--device", "cpu", *extra]
    return CliRunner().invoke(main, args)


def assert_refused(result, out, match: str):
    assert result.exit_code == 1, result.output  # bad input: exit status 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert match in errors[0], errors[0]
    assert not out.exists(), f"{out} was created"


def copy_tokenizer(src, dst):
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)


def test_missing_model_and_data(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    out = tmp_path / "out"
    assert_refused(run(tmp_path / "nope", data, out), out, "no such folder")
    assert_refused(run(tiny_llama_dir, tmp_path / "nope.jsonl", out), out, "does not exist")


def test_empty_dataset_and_unknown_format(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_refused(run(tiny_llama_dir, empty, out), out, "is empty")
    assert_refused(run(tiny_llama_dir, alpaca_data(tmp_path), out, "--format", "csvish"), out,
                   "unknown format 'csvish'")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    assert_refused(run(tiny_llama_dir, odd, out), out, "cannot detect the data format")


def test_seq_len_beyond_context(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert_refused(run(tiny_llama_dir, alpaca_data(tmp_path), out, "--seq-len", "512"), out,
                   "longer than the model's context")


def test_architecture_without_targetable_modules(tiny_llama_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=448)).save_pretrained(gpt2)
    copy_tokenizer(tiny_llama_dir, gpt2)
    out = tmp_path / "out"
    assert_refused(run(gpt2, alpaca_data(tmp_path), out), out, "'gpt2' (GPT2LMHeadModel) is not a family qdora knows")
    assert_refused(run(tiny_llama_dir, alpaca_data(tmp_path), out, "--target", "qkv_proj"), out,
                   "no module of LlamaForCausalLM matches")


def test_hidden_size_not_a_multiple_of_the_block(tmp_path):
    model = build_tiny_model(tmp_path / "m96", hidden_size=96, intermediate_size=192)
    out = tmp_path / "out"
    assert_refused(run(model, alpaca_data(tmp_path), out), out, "not a multiple of the NF4 block size 64")


def test_existing_output_and_missing_checkpoint(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    out = tmp_path / "out"
    assert_refused(run(tiny_llama_dir, data, out, "--resume", "latest"), out, "holds no checkpoint-STEP")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run(tiny_llama_dir, data, out)
    assert result.exit_code == 1 and "already holds files" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_bad_option_values(tiny_llama_dir, tmp_path):
    data = alpaca_data(tmp_path)
    out = tmp_path / "out"
    assert_refused(run(tiny_llama_dir, data, out, "--micro-batch", "0"), out, "--micro-batch must be")
    assert_refused(run(tiny_llama_dir, data, out, "--offload", "params"), out, "needs a CUDA device")
    assert_refused(run(tiny_llama_dir, data, out, "--micro-batch", "1000"), out, "fewer than one global batch")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nlearning_rate: 2\n")
    assert_refused(CliRunner().invoke(main, ["train", "--config", str(cfg)]), out, "unknown option")


def test_tensorboard_missing_is_a_clear_error(tiny_llama_dir, tmp_path, monkeypatch):
    # tensorboard is a test dependency; a None entry in sys.modules makes Python's import fail as if it were not
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "out"
    assert_refused(run(tiny_llama_dir, alpaca_data(tmp_path), out, "--report-to", "tensorboard"), out,
                   "needs a package that is not installed: pip install tensorboard")


def test_nan_loss_stops_with_a_message(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_tiny_model(tmp_path / "m")
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = run(model, alpaca_data(tmp_path), out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "loss became nan at step 1" in result.output and "no checkpoint was written" in result.output
    assert not (out / "adapter_model.safetensors").exists()
