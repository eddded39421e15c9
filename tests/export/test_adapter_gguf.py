"""`qdora export --adapter`: one step from adapter to GGUF, byte-identical to `qdora merge` followed by
`qdora export --model`, and no merged checkpoint written on the way."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.errors import QdoraError
from qdora.export.adapter_gguf import export_adapter_gguf
from qdora.export.gguf_export import export_gguf
from qdora.export.merge import merge_adapter
from qdora.testing.adapters import make_adapter
from qdora.testing.bnb_checkpoints import write_bnb_checkpoint
from qdora.testing.family_cases import build_case


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """(base, adapter) pairs: Llama 3 with llama3 rope and tied embeddings (all-linear DoRA), and Qwen2 with
    q/k/v biases (LoRA on some targets only: the others are written dequantized)."""
    root = tmp_path_factory.mktemp("adapter_gguf")
    llama = build_case("llama_tied_rope", root)
    qwen = build_case("qwen2", root)
    return {
        "llama-dora": (llama, make_adapter(llama, root / "adapters" / "r1", "dora")),
        "qwen2-lora": (qwen, make_adapter(qwen, root / "adapters" / "r2", "lora", target=["q_proj", "down_proj"],
                                          seed=1)),
    }


def merge_then_export(adapter, tmp_path, base="dequantized", dtype="bf16", outtype="f16", base_model=None, **kw):
    """The two-step reference; the merged folder takes the adapter's name (GGUF general.name)."""
    merged = merge_adapter(adapter, tmp_path / "two-step" / adapter.name, base_model=base_model, base=base,
                           dtype=dtype).output
    return export_gguf(merged, tmp_path / "two-step.gguf", outtype=outtype, **kw)


@pytest.mark.parametrize(("case", "base", "dtype", "outtype"), [
    ("llama-dora", "dequantized", "bf16", "f16"),
    ("llama-dora", "original", "fp32", "q8_0"),
    ("qwen2-lora", "dequantized", "bf16", "bf16"),
    ("qwen2-lora", "original", "fp16", "f32"),
])
def test_byte_identical_to_merge_then_export(cases, tmp_path, case, base, dtype, outtype):
    _, adapter = cases[case]
    ref = merge_then_export(adapter, tmp_path, base=base, dtype=dtype, outtype=outtype)
    out = tmp_path / "one-step" / "model.gguf"
    out.parent.mkdir()
    got = export_adapter_gguf(adapter, out, base=base, dtype=dtype, outtype=outtype)
    assert got == out
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]  # no merged checkpoint on the way


def test_prequantized_base_byte_identical_to_merge_then_export(cases, tmp_path):
    """On a bitsandbytes NF4 base the one-step export merges onto the dequantized weights, as merge does."""
    base_dir, adapter = cases["llama-dora"]
    bnb = write_bnb_checkpoint(base_dir, tmp_path / "bnb")
    ref = merge_then_export(adapter, tmp_path, base_model=bnb, dtype="fp32", outtype="f32")
    out = tmp_path / "one-step" / "model.gguf"
    out.parent.mkdir()
    export_adapter_gguf(adapter, out, base_model=bnb, dtype="fp32", outtype="f32")
    assert out.read_bytes() == ref.read_bytes()
    refused = tmp_path / "refused"
    refused.mkdir()
    with pytest.raises(QdoraError, match="original"):  # only the dequantized base exists: refused up front
        export_adapter_gguf(adapter, refused / "model.gguf", base_model=bnb, base="original")
    assert not any(refused.iterdir())


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
@pytest.mark.llamacpp
def test_cli_one_step_with_quantize_and_modelfile(cases, tmp_path):
    _, adapter = cases["llama-dora"]
    ref = merge_then_export(adapter, tmp_path, quantize="Q4_K_M", modelfile=True)
    out = tmp_path / "one" / "model.gguf"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["export", "--adapter", str(adapter), "--output", str(out),
                                       "--quantize", "Q4_K_M", "--modelfile"])
    assert result.exit_code == 0, result.output
    assert f"GGUF ready: {out.parent / 'model.Q4_K_M.gguf'}" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "model.Q4_K_M.gguf", "model.gguf"]
    assert out.read_bytes() == (tmp_path / "two-step.gguf").read_bytes()
    assert (out.parent / "model.Q4_K_M.gguf").read_bytes() == ref.read_bytes()
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./model.Q4_K_M.gguf")


def test_cli_needs_exactly_one_source(cases, tmp_path):
    base, adapter = cases["llama-dora"]
    for args in ([], ["--model", str(base), "--adapter", str(adapter)]):
        result = CliRunner().invoke(main, ["export", *args, "--output", str(tmp_path / "m.gguf")])
        assert result.exit_code == 1 and "give exactly one of --model" in result.output
        assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_adapter_given_as_model_points_to_adapter_option(cases, tmp_path):
    _, adapter = cases["llama-dora"]
    result = CliRunner().invoke(main, ["export", "--model", str(adapter), "--output", str(tmp_path / "m.gguf")])
    assert result.exit_code == 1 and f"export it with --adapter {adapter}" in result.output


def test_adapter_of_another_base_refused_before_writing(cases, tmp_path):
    _, adapter = cases["llama-dora"]
    other = build_case("llama", tmp_path / "bases", intermediate_size=96)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["export", "--adapter", str(adapter), "--base-model", str(other),
                                       "--output", str(out / "m.gguf")])
    assert result.exit_code == 1 and "does not fit" in result.output, result.output
    assert list(out.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(("family", "tokenizer", "method", "target"), [
    ("qwen3_moe", "qwen2", "dora", "all-linear,experts"),
    ("qwen2_moe", "qwen2", "lora", "all-linear,experts"),  # shared expert and its [1, H] gate
])
def test_mixture_of_experts_byte_identical(tmp_path, family, tokenizer, method, target):
    """Experts are merged one checkpoint tensor at a time and stacked while writing, as in two steps."""
    from qdora.testing.tiny_models import build_tiny_model

    base = build_tiny_model(tmp_path / "base", family=family, tokenizer=tokenizer, seed=1, initializer_range=0.2)
    adapter = make_adapter(base, tmp_path / "adapters" / "moe", method, target=target)
    ref = merge_then_export(adapter, tmp_path)
    out = export_adapter_gguf(adapter, tmp_path / "one.gguf")
    assert out.read_bytes() == ref.read_bytes()
