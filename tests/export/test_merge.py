"""`qdora merge`: the merged checkpoint, loaded by plain transformers, is the adapted (trained) model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qdora.cli import main
from qdora.core.adapt import adapter_layers
from qdora.core.adapter_io import apply_adapter
from qdora.core.layer import adapter_scale, merge_weight
from qdora.core.nf4 import nf4_from_weight
from qdora.errors import QdoraError
from qdora.export.adapter_merge import edited_config
from qdora.export.merge import merge_adapter
from qdora.io.weights import WeightReader
from qdora.testing.adapters import make_adapter

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def load(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def adapted_logits(base_dir, adapter):
    model = load(base_dir)
    apply_adapter(model, adapter)
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "dora": make_adapter(tiny_llama_dir, root / "dora", "dora"),
        # only some targets: the other block linears must come out dequantized, as training saw them
        "lora": make_adapter(tiny_llama_dir, root / "lora", "lora", target=["q_proj", "down_proj"], seed=1),
    }


@pytest.mark.parametrize("method", ["dora", "lora"])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_merged_model_reproduces_the_adapted_model(tiny_llama_dir, adapters, tmp_path, method, dtype, tol):
    res = merge_adapter(adapters[method], tmp_path / "out", dtype=dtype)
    assert res.merged == (14 if method == "dora" else 4) and res.merged + res.dequantized == 14
    merged = load(res.output, torch.float32 if dtype == "fp32" else torch.bfloat16)
    with torch.no_grad():
        ours = merged(IDS).logits
    assert rel(ours, adapted_logits(tiny_llama_dir, adapters[method])) <= tol
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_equals_peft_merge_and_unload_on_the_dequantized_base(tiny_llama_dir, adapters, tmp_path, method):
    from peft import PeftModel

    model = load(tiny_llama_dir)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if ".layers." in name and isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(nf4_from_weight(mod.weight.data).dequantize(torch.float32))
    reference = PeftModel.from_pretrained(model, adapters[method]).merge_and_unload().state_dict()
    out = merge_adapter(adapters[method], tmp_path / "out", dtype="fp32").output
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(reference)
    for key, t in ours.items():
        assert rel(t, reference[key]) <= 1e-5, key


def test_qwen2_with_biases_tied_embeddings_and_a_bf16_base(tmp_path):
    from qdora.testing.tiny_models import build_tiny_model

    base = build_tiny_model(tmp_path / "qwen", family="qwen2", dtype=torch.bfloat16, tie_word_embeddings=True)
    adapter = make_adapter(base, tmp_path / "a", "dora", target=["q_proj", "v_proj", "up_proj"])
    res = merge_adapter(adapter, tmp_path / "out", dtype="fp32")
    written = load_file(str(res.output / "model.safetensors"))
    assert "lm_head.weight" not in written and "model.layers.0.self_attn.q_proj.bias" in written
    with torch.no_grad():
        ours = load(res.output)(IDS).logits
    assert rel(ours, adapted_logits(base, adapter)) <= 1e-4


def test_sharded_input_and_output_load_with_plain_transformers(tiny_llama_dir, adapters, tmp_path):
    base = tmp_path / "sharded-base"
    load(tiny_llama_dir).save_pretrained(base, max_shard_size="200KB")
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, base / f.name)
    assert (base / "model.safetensors.index.json").is_file()
    res = merge_adapter(adapters["dora"], tmp_path / "out", base_model=base, dtype="fp32", shard_size="150KB")
    index = json.loads((res.output / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert res.shards == len(files) > 2 and files[0] == f"model-00001-of-{res.shards:05d}.safetensors"
    assert set(index["weight_map"]) == set(WeightReader(base).keys())
    for f in files:  # each shard respects the limit unless one tensor alone is larger
        tensors = load_file(str(res.output / f))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 150_000 or len(tensors) == 1
    with torch.no_grad():
        ours = load(res.output)(IDS).logits
    assert rel(ours, adapted_logits(tiny_llama_dir, adapters["dora"])) <= 1e-4
    cfg = json.loads((res.output / "config.json").read_text())
    assert cfg["dtype"] == "float32" and "quantization_config" not in cfg
    tok, ref_tok = AutoTokenizer.from_pretrained(res.output), AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tok.chat_template == ref_tok.chat_template and tok.chat_template
    assert (res.output / "generation_config.json").is_file()


def test_base_original_is_the_hand_merge_and_differs_by_the_quantization_error(tiny_llama_dir, adapters, tmp_path):
    adapter = adapters["dora"]
    orig = merge_adapter(adapter, tmp_path / "orig", dtype="fp32", base="original").output
    deq = merge_adapter(adapter, tmp_path / "deq", dtype="fp32").output
    a_orig, a_deq = load_file(str(orig / "model.safetensors")), load_file(str(deq / "model.safetensors"))
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    reference = load(tiny_llama_dir)
    apply_adapter(reference, adapter)
    key = "model.layers.1.mlp.up_proj.weight"
    layer = adapter_layers(reference)["model.layers.1.mlp.up_proj"]
    hand = merge_weight(base[key], layer.lora_A, layer.lora_B, layer.magnitude, adapter_scale(4, 8, False))
    torch.testing.assert_close(a_orig[key], hand, rtol=1e-6, atol=1e-7)
    q_err = rel(nf4_from_weight(base[key]).dequantize(torch.float32), base[key])
    assert 0.3 * q_err <= rel(a_orig[key], a_deq[key]) <= 3 * q_err
    assert torch.equal(a_orig["model.embed_tokens.weight"], a_deq["model.embed_tokens.weight"])


def test_config_loses_quantization_config(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"load_in_4bit": True}
    cfg["torch_dtype"] = "float32"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    new = edited_config(tmp_path / "m", torch.bfloat16)
    assert "quantization_config" not in new and new["dtype"] == new["torch_dtype"] == "bfloat16"


def _bad_adapter(adapters, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(adapters["dora"], bad)
    cfg_path = bad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("case,match", [
    ("missing adapter", "does not exist"),
    ("invalid config", "not valid JSON"),
    ("no base model", "not a local model folder"),
    ("does not fit", "does not fit"),
    ("unknown dtype", "unknown dtype"),
    ("output exists", "not empty"),
])
def test_bad_input_is_one_clear_error_and_leaves_nothing(tiny_llama_dir, adapters, tmp_path, case, match):
    adapter, kwargs = adapters["dora"], {}
    if case == "missing adapter":
        adapter = tmp_path / "nope"
    elif case == "invalid config":
        adapter = tmp_path / "bad"
        shutil.copytree(adapters["dora"], adapter)
        (adapter / "adapter_config.json").write_text("{not json")
    elif case == "no base model":
        adapter = _bad_adapter(adapters, tmp_path, lambda c: c.update(base_model_name_or_path=str(tmp_path / "x")))
    elif case == "does not fit":
        adapter = _bad_adapter(adapters, tmp_path, lambda c: c.update(r=3))
    elif case == "unknown dtype":
        kwargs["dtype"] = "int8"
    out = tmp_path / "out"
    if case == "output exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QdoraError, match=match):
        merge_adapter(adapter, out, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "output exists":
        assert (out / "keep.txt").read_text() == "mine"
    # the CLI turns the same error into one line and exit code 1
    args = ["merge", "--adapter", str(adapter), "--output", str(out), "--dtype", kwargs.get("dtype", "bf16")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and match in res.output and "Traceback" not in res.output


def test_cli_merges_and_overwrites(adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    res = CliRunner().invoke(main, ["merge", "--adapter", str(adapters["lora"]), "--output", str(out),
                                    "--overwrite", "--shard-size", "100KB"])
    assert res.exit_code == 0, res.output
    assert "merged 4 adapted weights, dequantized 10" in res.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors.index.json").is_file()


def test_failure_mid_stream_leaves_the_old_output_and_no_temporary(adapters, tmp_path, monkeypatch):
    from qdora.export.adapter_merge import AdapterMerge

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous merge")
    real, calls = AdapterMerge.merged, []

    def failing(self, key, w):  # a disk-full / interrupted run, after some shards were written
        calls.append(key)
        if len(calls) == 9:
            raise OSError("No space left on device")
        return real(self, key, w)

    monkeypatch.setattr(AdapterMerge, "merged", failing)
    with pytest.raises(OSError):
        merge_adapter(adapters["dora"], out, dtype="fp32", shard_size="50KB", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_output_bytes_predicts_the_merged_folder(tiny_llama_dir, adapters, tmp_path, dtype):
    """The free-space check's figure: at least what is written, and not much more (headers, index)."""
    from qdora.export.merge import output_bytes
    from qdora.options import torch_dtype

    predicted = output_bytes(WeightReader(tiny_llama_dir), tiny_llama_dir, torch_dtype(dtype))
    out = merge_adapter(adapters["dora"], tmp_path / "out", dtype=dtype, shard_size="100kB").output
    written = sum(f.stat().st_size for f in out.iterdir())
    assert written <= predicted <= written * 1.05 + 64 * 1024
