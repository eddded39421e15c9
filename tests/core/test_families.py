"""The family registry refuses early, in one message, and every command says the same."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.core.families import Family, check_family, families, family_of, register
from qdora.errors import QdoraError
from qdora.testing.runs import chat_data


def _config(tmp_path, **cfg):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_every_registered_family_trains_and_merges():
    types = {f.model_type for f in families()}
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"} <= types
    assert family_of({"model_type": "qwen3"}).gguf_arch == "qwen3"


def test_unknown_family_names_what_is_supported():
    with pytest.raises(QdoraError, match=r"'gpt_bigcode'.*not a family qdora knows.*qwen3 \(Qwen3"):
        check_family({"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"]})


@pytest.mark.parametrize("cfg", [
    {"model_type": "mixtral_like", "num_local_experts": 8},
    {"model_type": "some_moe", "num_experts": 64, "num_experts_per_tok": 8},
    {"model_type": "vlm_moe", "text_config": {"n_routed_experts": 16}},
])
def test_mixture_of_experts_refused_as_such(cfg):
    with pytest.raises(QdoraError, match="mixture-of-experts"):
        family_of(cfg)


def test_export_only_gap_refuses_train_unless_allowed(caplog):
    family = register(Family("tiny_noexport", "Tiny", missing="no llama.cpp arch"))
    try:
        with pytest.raises(QdoraError, match=r"cannot be exported to GGUF.*no llama.cpp arch.*--allow-no-export"):
            check_family({"model_type": "tiny_noexport"})
        with caplog.at_level(logging.WARNING):
            assert check_family({"model_type": "tiny_noexport"}, allow_no_export=True) is family
        assert "--allow-no-export" in caplog.text
        with pytest.raises(QdoraError, match="cannot be exported"):
            check_family({"model_type": "tiny_noexport"}, ("export",), command="qdora export")
    finally:
        from qdora.core import families as registry

        registry._REGISTRY.pop("tiny_noexport")


def test_untrainable_family_refused_even_with_the_flag():
    register(Family("tiny_refused", "Tiny", train=False, merge=False, missing="experts are not adapted"))
    try:
        with pytest.raises(QdoraError, match="cannot be trained or merged or exported.*experts are not adapted"):
            check_family({"model_type": "tiny_refused"}, allow_no_export=True)
    finally:
        from qdora.core import families as registry

        registry._REGISTRY.pop("tiny_refused")


def test_train_plan_merge_refuse_before_writing(tmp_path):
    """The CLI refuses an unknown family with exit 1 and the same message, leaving no output behind."""
    model = _config(tmp_path / "m", model_type="olmoe", num_experts=8, architectures=["OlmoeForCausalLM"])
    (model / "model.safetensors").write_bytes(b"")
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(main, ["train", "--model", str(model), "--data", str(chat_data(tmp_path)),
                               "--output", str(out)])
    assert res.exit_code == 1 and "mixture-of-experts" in res.output and not out.exists()
    res = runner.invoke(main, ["plan", "--model", str(model)])
    assert res.exit_code == 1 and "mixture-of-experts" in res.output
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True,
        "base_model_name_or_path": str(model)}))
    res = runner.invoke(main, ["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    assert res.exit_code == 1 and "mixture-of-experts" in res.output and not (tmp_path / "merged").exists()


def test_image_text_gemma3_refused_with_the_way_out():
    with pytest.raises(QdoraError, match=r"Gemma 3 image-text.*cannot be trained.*gemma3_text"):
        check_family({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}})


def test_allow_no_export_lets_train_go_on(tiny_llama_dir, tmp_path):
    """A family that trains and merges but does not export: refused by `qdora train` and `qdora plan` (exit
    1, nothing written) unless --allow-no-export, then trained with a warning."""
    from qdora.core import families as registry

    original = registry._REGISTRY["llama"]
    register(Family("llama", "Llama (export switched off for this test)", missing="no GGUF arch here"))
    try:
        runner = CliRunner()
        out = tmp_path / "run"
        args = ["train", "--model", str(tiny_llama_dir), "--data", str(chat_data(tmp_path)), "--output", str(out),
                "--max-steps", "1", "--seq-len", "64", "--rank", "4", "--dtype", "fp32", "--device", "cpu"]
        res = runner.invoke(main, args)
        assert res.exit_code == 1 and "--allow-no-export" in res.output and not out.exists()
        assert runner.invoke(main, ["plan", "--model", str(tiny_llama_dir)]).exit_code == 1
        planned = runner.invoke(main, ["plan", "--model", str(tiny_llama_dir), "--allow-no-export"])
        assert "Error" not in planned.output and "GiB" in planned.output, planned.output
        res = runner.invoke(main, [*args, "--allow-no-export"])
        assert res.exit_code == 0, res.output
        assert (out / "adapter_model.safetensors").is_file()
    finally:
        register(original)
