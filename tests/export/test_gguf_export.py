"""GGUF export without llama.cpp: metadata read back with gguf's reader, layouts, errors, atomic writes.

The checks against real llama.cpp (tokenization, logits, greedy decoding, K-quants) are in
test_export_llamacpp.py; these run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from qdora.cli import main
from qdora.errors import QdoraError
from qdora.export.gguf_export import export_gguf
from qdora.export.gguf_tensors import permute_rotary, unpermute_rotary
from qdora.io.failures import WriteFailure
from qdora.testing.family_cases import LLAMA3_ROPE, build_case

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TT = gguf.TokenType


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_models")
    return {name: build_case(name, root) for name in ("llama", "llama_tied_rope", "mistral_spm", "qwen2")}


def _read(path: Path) -> tuple[dict, dict]:
    """(metadata key -> python value, tensor name -> ReaderTensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        fields[key] = field.contents()
    return fields, {t.name: t for t in reader.tensors}


def _hf(model_dir: Path, name: str) -> np.ndarray:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# --- metadata ---------------------------------------------------------------------------------------


def test_llama_bpe_metadata(models, tmp_path):
    out = export_gguf(models["llama"], tmp_path / "m.gguf", outtype="f16")
    meta, tensors = _read(out)
    tok = _tokenizer(models["llama"])
    cfg = json.loads((models["llama"] / "config.json").read_text())
    rows = cfg["vocab_size"]
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == rows > len(tok)  # padded to the embedding rows
    assert tokens[len(tok):] == [f"[PAD{i}]" for i in range(len(tok), rows)]
    assert set(types[len(tok):]) == {TT.UNUSED}
    for text, tid in tok.get_vocab().items():
        assert tokens[tid] == text
        special = tid in tok.added_tokens_decoder
        assert types[tid] == (TT.CONTROL if special else TT.NORMAL), text
    tj = json.loads((models["llama"] / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in tj["model"]["merges"]]
    assert meta["tokenizer.ggml.bos_token_id"] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template
    # tensors: 2-D in f16, norms in f32, untied output, no rotary buffer
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert list(tensors["token_embd.weight"].shape) == [64, rows]  # GGUF lists dims fastest-first
    assert tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in tensors and "rope_freqs.weight" not in tensors
    assert len(tensors) == 2 + 1 + 2 * 9


def test_tied_embeddings_and_llama3_rope(models, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out = export_gguf(models["llama_tied_rope"], tmp_path / "m.gguf", outtype="f32")
    meta, tensors = _read(out)
    assert "output.weight" not in tensors  # llama.cpp reuses token_embd
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    # transformers' own llama3 inverse frequencies are the plain ones divided by these factors
    config = AutoConfig.from_pretrained(models["llama_tied_rope"])
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    np.testing.assert_allclose(factors, (plain / inv_freq.double()).numpy(), rtol=1e-5)
    assert factors[0] == 1.0 and factors[-1] == LLAMA3_ROPE["factor"]
    assert 1.0 < factors[2] < LLAMA3_ROPE["factor"]  # the interpolated band is exercised too
    assert "llama.rope.scaling.type" not in meta  # llama3 scaling lives in rope_freqs alone


def test_sentencepiece_metadata(models, tmp_path):
    out = export_gguf(models["mistral_spm"], tmp_path / "m.gguf")
    meta, _ = _read(out)
    tok = _tokenizer(models["mistral_spm"])
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert meta["general.architecture"] == "llama"  # Mistral is written as llama
    assert meta["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.pre" not in meta and "tokenizer.ggml.merges" not in meta
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[:3] == [TT.UNKNOWN, TT.CONTROL, TT.CONTROL]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {TT.BYTE}
    assert meta["tokenizer.ggml.unknown_token_id"] == 0
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    # scores order pieces as the merges do: a piece made by an earlier merge scores strictly higher
    vocab = tok.get_vocab()
    merges = json.loads((models["mistral_spm"] / "tokenizer.json").read_text())["model"]["merges"]
    made = [scores[vocab[p]] for p in dict.fromkeys(a + b for a, b in merges)]
    assert len(made) > 50 and all(a > b for a, b in zip(made, made[1:], strict=False))
    assert len(tokens) == json.loads((models["mistral_spm"] / "config.json").read_text())["vocab_size"]


def test_qwen2_metadata_biases_and_no_permutation(models, tmp_path):
    out = export_gguf(models["qwen2"], tmp_path / "m.gguf", outtype="f32")
    meta, tensors = _read(out)
    assert meta["general.architecture"] == "qwen2"
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "output.weight" not in tensors
    for proj, short in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        w = np.asarray(tensors[f"blk.0.{short}.weight"].data)
        np.testing.assert_array_equal(w, _hf(models["qwen2"], f"model.layers.0.self_attn.{proj}.weight"))
        b = np.asarray(tensors[f"blk.0.{short}.bias"].data)
        assert tensors[f"blk.0.{short}.bias"].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(b, _hf(models["qwen2"], f"model.layers.0.self_attn.{proj}.bias"))
        assert np.abs(b).max() > 0.1  # the biases are really exercised


@pytest.mark.parametrize("kind, name", [("llama3", "llama-bpe"), ("qwen2", "qwen2")])
def test_tiny_tokenizers_saved_split_regex_is_recognised(kind, name, tmp_path):
    """What a saved tokenizer.json holds (after the tokenizers library's round trip) maps to the name."""
    from qdora.export.gguf_tokenizer import bpe_pre_name
    from qdora.testing.tiny_tokenizers import build_tokenizer

    build_tokenizer(kind).save_pretrained(tmp_path)
    assert bpe_pre_name(json.loads((tmp_path / "tokenizer.json").read_text())) == name


# --- Q/K layout ---------------------------------------------------------------------------------------


def test_llama_qk_permuted_v_not(models, tmp_path):
    out = export_gguf(models["llama"], tmp_path / "m.gguf", outtype="f32")
    _, tensors = _read(out)
    q_hf = _hf(models["llama"], "model.layers.1.self_attn.q_proj.weight")
    k_hf = _hf(models["llama"], "model.layers.1.self_attn.k_proj.weight")
    q, k = np.asarray(tensors["blk.1.attn_q.weight"].data), np.asarray(tensors["blk.1.attn_k.weight"].data)
    np.testing.assert_array_equal(q, permute_rotary(q_hf, 4))
    np.testing.assert_array_equal(k, permute_rotary(k_hf, 2))
    np.testing.assert_array_equal(unpermute_rotary(q, 4), q_hf)
    assert not np.array_equal(q, q_hf)
    v_hf = _hf(models["llama"], "model.layers.1.self_attn.v_proj.weight")
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_v.weight"].data), v_hf)


def _rope_halves(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """HF Llama: dimension i rotates with i + d/2 (rotate_half)."""
    d = x.shape[-1]
    ang = pos / theta ** (np.arange(0, d, 2) / d)
    cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + rotated * sin


def _rope_pairs(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """llama.cpp's llama arch: dimensions 2i and 2i+1 rotate together."""
    d = x.shape[-1]
    ang = pos / theta ** (np.arange(0, d, 2) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def test_permutation_turns_rotate_half_into_adjacent_pairs():
    """Attention scores are the same under HF's rope on W and llama.cpp's rope on the permuted W."""
    rng = np.random.default_rng(0)
    n_head, head_dim, hidden = 3, 8, 12
    wq, wk = rng.standard_normal((2, n_head * head_dim, hidden))
    x1, x2 = rng.standard_normal((2, hidden))
    for n in (n_head,):
        q_hf = _rope_halves((wq @ x1).reshape(n, head_dim), pos=5)
        k_hf = _rope_halves((wk @ x2).reshape(n, head_dim), pos=2)
        q_gg = _rope_pairs((permute_rotary(wq, n) @ x1).reshape(n, head_dim), pos=5)
        k_gg = _rope_pairs((permute_rotary(wk, n) @ x2).reshape(n, head_dim), pos=2)
        np.testing.assert_allclose((q_gg * k_gg).sum(-1), (q_hf * k_hf).sum(-1), rtol=1e-10)
        # without the permutation the scores differ: the test can fail
        q_bad = _rope_pairs((wq @ x1).reshape(n, head_dim), pos=5)
        k_bad = _rope_pairs((wk @ x2).reshape(n, head_dim), pos=2)
        assert not np.allclose((q_bad * k_bad).sum(-1), (q_hf * k_hf).sum(-1))
    bias = rng.standard_normal(n_head * head_dim)
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(bias, n_head), n_head), bias)


# --- outtypes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outtype", "qtype", "ftype"),
    [
        ("f32", gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        ("bf16", gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    ],
)
def test_outtypes(models, tmp_path, outtype, qtype, ftype):
    out = export_gguf(models["llama"], tmp_path / "m.gguf", outtype=outtype)
    meta, tensors = _read(out)
    assert meta["general.file_type"] == ftype
    assert tensors["blk.0.ffn_down.weight"].tensor_type == qtype
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    w = gguf.quants.dequantize(tensors["blk.0.ffn_down.weight"].data, qtype).reshape(64, 128)
    ref = _hf(models["llama"], "model.layers.0.mlp.down_proj.weight")
    tol = {"f32": 0, "bf16": 2**-8, "q8_0": 2**-7}[outtype]
    assert np.abs(w - ref).max() <= tol * np.abs(ref).max()


# --- bad input, atomic output --------------------------------------------------------------------------


def test_not_a_model_folder(tmp_path):
    with pytest.raises(QdoraError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "m.gguf")
    with pytest.raises(QdoraError, match="not a folder"):
        export_gguf(tmp_path / "missing", tmp_path / "m.gguf")


def test_adapter_folder_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(QdoraError, match="adapter.*qdora merge"):
        export_gguf(tmp_path, tmp_path / "m.gguf")


def test_unknown_outtype(models, tmp_path):
    with pytest.raises(QdoraError, match="unknown outtype 'q4'.*f32, f16, bf16, q8_0"):
        export_gguf(models["llama"], tmp_path / "m.gguf", outtype="q4")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_names_supported_ones(models, tmp_path):
    d = _copy(models["llama"], tmp_path / "phi")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QdoraError, match=r"'gpt_neox' \(GPTNeoXForCausalLM\) is not a family.*llama \(Llama.*qwen2"):
        export_gguf(d, tmp_path / "m.gguf")


def test_unknown_split_regex_names_it(models, tmp_path):
    d = _copy(models["llama"], tmp_path / "odd")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,2}|\s+"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(QdoraError, match=r"unrecognised BPE pre-tokenizer.*\\\\p\{N\}\{1,2\}"):
        export_gguf(d, tmp_path / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["odd"]  # nothing written, not even a temp file


def test_leftover_adapter_tensor_is_refused(models, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(models["llama"], tmp_path / "half_merged")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QdoraError, match="lora_A.*no GGUF counterpart"):
        export_gguf(d, tmp_path / "m.gguf")


def test_failure_while_writing_leaves_no_partial_file(models, tmp_path, monkeypatch):
    """A failure after the header is written (here: disk full on the 3rd tensor) removes the temp file and
    leaves an existing output untouched."""
    import qdora.export.gguf_export as export_mod

    real = export_mod.write_tensor_data

    def fail_midway(writer, plans, **kw):
        real(writer, plans[:2], **kw)
        raise OSError(28, "No space left on device")

    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(export_mod, "write_tensor_data", fail_midway)
    with pytest.raises(WriteFailure, match=f"cannot write the GGUF file to {out}: no space left on the device"):
        export_gguf(models["llama"], out)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --- Modelfile ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected", "stops"),
    [
        ("llama", "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>",
         ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        ("qwen2", "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n", ["<|im_start|>", "<|im_end|>"]),
        ("mistral_spm", "[INST] {{ if $system }}", ["[INST]", "[/INST]", "</s>"]),
    ],
)
def test_modelfile(models, tmp_path, case, expected, stops):
    out = export_gguf(models[case], tmp_path / "tiny-chat.gguf", modelfile=True)
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./tiny-chat.gguf\n")
    assert out == tmp_path / "tiny-chat.gguf"
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert expected in template
    assert template.count("{{") == template.count("}}")
    assert [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("PARAMETER stop")] == [
        f'"{s}"' for s in stops
    ]


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_export_and_errors(models, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    result = runner.invoke(main, ["export", "--model", str(models["qwen2"]), "--output", str(out),
                                  "--outtype", "q8_0", "--modelfile"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "Modelfile").is_file()
    assert str(out) in result.output
    result = runner.invoke(main, ["export", "--model", str(tmp_path), "--output", str(tmp_path / "x.gguf")])
    assert result.exit_code == 1
    assert "Error: " in result.output and "no config.json" in result.output
    result = runner.invoke(main, ["export", "--model", str(models["qwen2"]), "--output", str(out),
                                  "--outtype", "q4"])
    assert result.exit_code == 1 and "unknown outtype 'q4'" in result.output
    result = runner.invoke(main, ["export", "--model", str(models["qwen2"]), "--output", str(out),
                                  "--quantize", "Q9_XX"])
    assert result.exit_code == 1
    assert "unknown quantization 'Q9_XX'; llama.cpp offers" in result.output  # llama-cpp-python is a test dependency


# --- checkpoints as merges write them -----------------------------------------------------------------


def test_bf16_checkpoint_exports_losslessly_to_bf16(tmp_path):
    from qdora.testing.tiny_models import build_tiny_model

    d = build_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16, initializer_range=0.2)
    _, tensors = _read(export_gguf(d, tmp_path / "m.gguf", outtype="bf16"))
    with safe_open(d / "model.safetensors", framework="pt") as f:
        src = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    ours = np.asarray(tensors["blk.0.ffn_up.weight"].data).view(np.uint16).reshape(src.shape)
    np.testing.assert_array_equal(ours, src.view(torch.int16).numpy().view(np.uint16))


def test_sharded_checkpoint_equals_single_file(models, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(models["llama"] / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = export_gguf(models["llama"], tmp_path / "single.gguf", outtype="f32")
    b = export_gguf(sharded, tmp_path / "sharded.gguf", outtype="f32")
    ta, tb = _read(a)[1], _read(b)[1]
    assert list(ta) == list(tb)
    for name in ta:
        np.testing.assert_array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data))


@pytest.mark.slow
def test_quantize_without_llama_cpp_says_how_to_install(models, tmp_path):
    """Run in a fresh interpreter where `import llama_cpp` fails, as on a machine without it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "from qdora.export.gguf_export import export_gguf\n"
        "from qdora.errors import QdoraError\n"
        f"try:\n    export_gguf({str(models['llama'])!r}, {str(tmp_path / 'm.gguf')!r}, quantize='Q4_K_M')\n"
        "except QdoraError as e:\n    print('QdoraError:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "QdoraError: --quantize needs llama-cpp-python" in out.stdout
    assert "install_llamacpp.sh" in out.stdout
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


@pytest.mark.parametrize("outtype", ["f16", "q8_0", "bf16"])
def test_row_blocks_give_the_same_file(models, tmp_path, monkeypatch, outtype):
    """Converting a few rows at a time (as for a huge embedding) writes the same bytes as whole tensors."""
    import qdora.export.gguf_tensors as tensors_mod

    whole = export_gguf(models["mistral_spm"], tmp_path / "whole.gguf", outtype=outtype).read_bytes()
    monkeypatch.setattr(tensors_mod, "CHUNK_BYTES", 3 * 64 * 4 + 5)  # 3 rows of the 64-wide tensors
    blocks = export_gguf(models["mistral_spm"], tmp_path / "blocks.gguf", outtype=outtype).read_bytes()
    assert blocks == whole
