"""Exported GGUF files checked in real llama.cpp (llama-cpp-python) against transformers on the same model.

For each family: llama.cpp tokenizes like the HF tokenizer, its next-token logits match transformers'
(tolerances below, relative to the largest |logit|), and greedy decoding gives the same 10 tokens.

Tolerances measured on these models (max |diff| / max |logit|): f32 ~2e-6 (float32 summation order),
f16 ~3e-3 (f16 weights, and llama.cpp rounds activations to f16 for the matmuls), bf16 ~3e-2,
q8_0 ~0.15 (llama.cpp also quantizes activations to 8 bits), so q8_0 is checked for agreement of the
argmax and byte-identity with llama.cpp's own Q8_0 instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import llama_cpp  # a test dependency (scripts/setup.sh --llamacpp): a missing one fails loudly, never skips
import numpy as np
import pytest
import torch

from qdora.export.gguf_export import export_gguf
from qdora.export.llamacpp_quantize import quantize_gguf
from qdora.testing.family_cases import build_case
from qdora.testing.llamacpp_oracle import (
    PROMPTS,
    TEXTS,
    LlamaCpp,
    Reference,
    assert_same_tokenization,
    rel_diff,
)

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = ["llama", "llama_tied_rope", "mistral_spm", "qwen2"]
REL_TOL = {"f32": 1e-4, "f16": 1e-2, "bf16": 6e-2}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamacpp_models")
    return {name: build_case(name, root) for name in CASES}


@pytest.fixture(scope="module")
def refs(models) -> dict[str, Reference]:
    return {name: Reference(path) for name, path in models.items()}


@pytest.mark.parametrize("case", CASES)
def test_f32_matches_transformers(models, refs, tmp_path, case):
    ref = refs[case]
    cpp = LlamaCpp(export_gguf(models[case], tmp_path / f"{case}.gguf", outtype="f32"))
    try:
        assert_same_tokenization(cpp, ref.tok, TEXTS)
        for prompt in PROMPTS:
            ids = ref.tok(prompt)["input_ids"]
            hf = ref.logits(ids)
            assert cpp.logits(ids).shape == hf.shape  # one column per (padded) embedding row
            assert rel_diff(hf, cpp.logits(ids)) <= REL_TOL["f32"]
            assert cpp.greedy(ids) == ref.greedy(ids)
    finally:
        cpp.close()


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
@pytest.mark.parametrize("case", ["llama_tied_rope", "mistral_spm", "qwen2"])
def test_half_precision_close(models, refs, tmp_path, case, outtype):
    ref = refs[case]
    cpp = LlamaCpp(export_gguf(models[case], tmp_path / f"{case}.gguf", outtype=outtype))
    try:
        ids = ref.tok(PROMPTS[0])["input_ids"]
        assert rel_diff(ref.logits(ids), cpp.logits(ids)) <= REL_TOL[outtype]
        if outtype == "f16":
            assert cpp.greedy(ids) == ref.greedy(ids)
    finally:
        cpp.close()


def test_llama3_rope_scaling_is_what_is_tested(models, refs):
    """Control: with default rope the same weights give logits far outside the f32 tolerance, so the
    rope_freqs tensor is really checked by test_f32_matches_transformers[llama_tied_rope]."""
    from transformers import AutoModelForCausalLM

    default_rope = {"rope_type": "default", "rope_theta": 1e4}
    plain = AutoModelForCausalLM.from_pretrained(
        models["llama_tied_rope"], dtype=torch.float32, rope_parameters=default_rope
    ).eval()
    ref = refs["llama_tied_rope"]
    ids = ref.tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        other = plain(torch.tensor([ids])).logits[0].numpy()
    assert rel_diff(ref.logits(ids), other) > 100 * REL_TOL["f32"]


def test_q8_0_is_llamacpp_q8_0_and_agrees(models, refs, tmp_path):
    f32 = export_gguf(models["llama"], tmp_path / "m-f32.gguf", outtype="f32")
    ours = export_gguf(models["llama"], tmp_path / "m-q8.gguf", outtype="q8_0")
    theirs = quantize_gguf(f32, tmp_path / "m-q8-llamacpp.gguf", "Q8_0")
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        ours_bytes, their_bytes = (np.asarray(t[name].data).view(np.uint8) for t in (a, b))
        assert np.array_equal(ours_bytes, their_bytes), name
    ref = refs["llama"]
    cpp = LlamaCpp(ours)
    try:
        ids = ref.tok(PROMPTS[0] + " fox near the river. It counts 42 stars")["input_ids"]
        hf, q8 = ref.logits(ids), cpp.logits(ids)
        assert (hf.argmax(-1) == q8.argmax(-1)).mean() >= 0.8
        assert np.corrcoef(hf.ravel(), q8.ravel())[0, 1] > 0.98
    finally:
        cpp.close()


def test_q4_k_m_through_llamacpp_quantizer(tmp_path):
    """Rows of 256 so that K-quants really apply (llama.cpp falls back for narrower rows)."""
    model_dir = build_case("llama", tmp_path, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                           num_key_value_heads=4)
    out = export_gguf(model_dir, tmp_path / "big.gguf", quantize="Q4_K_M", modelfile=True)
    assert out == tmp_path / "big.Q4_K_M.gguf" and (tmp_path / "big.gguf").is_file()
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./big.Q4_K_M.gguf\n")
    reader = gguf.GGUFReader(out)
    types = {t.tensor_type for t in reader.tensors}
    assert gguf.GGMLQuantizationType.Q4_K in types
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    ref = Reference(model_dir)
    cpp = LlamaCpp(out)
    try:
        ids = ref.tok(PROMPTS[1])["input_ids"]
        hf, q4 = ref.logits(ids), cpp.logits(ids)
        assert np.isfinite(q4).all()
        # 4-bit random weights and 8-bit activations: measured correlation 0.87 with the f32 logits
        assert np.corrcoef(hf.ravel(), q4.ravel())[0, 1] > 0.75
    finally:
        cpp.close()


@pytest.mark.parametrize(
    ("case", "plain_added"),
    [("llama", ["<think>", "</think>"]), ("qwen2", ["<think>", "</think>"]), ("mistral_spm", [])],
)
def test_tokens_added_by_a_fine_tune(models, tmp_path, case, plain_added):
    """A fine-tune that added tokens (the case llama.cpp's hash-based converter refuses) exports, and
    llama.cpp splits them out of text like HF. SentencePiece vocabularies get special tokens only: HF
    matches plain added tokens there on the `▁`-normalized text, which llama.cpp does not reproduce."""
    from transformers import AutoTokenizer

    d = tmp_path / "finetuned"
    shutil.copytree(models[case], d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(plain_added)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    out = export_gguf(d, tmp_path / "ft.gguf")
    types = gguf.GGUFReader(out).fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.convert_tokens_to_ids("<|tool|>")] == gguf.TokenType.CONTROL
    for t in plain_added:
        assert types[tok.convert_tokens_to_ids(t)] == gguf.TokenType.USER_DEFINED
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        texts = ["a <|tool|> b", "<|tool|>x", "x<|tool|>\n"]
        if plain_added:
            texts += ["a <think> b </think>c", "<think>x</think> <|tool|> y", " <think>\n"]
        for text in texts:
            expected = tok(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, text
    finally:
        llm.close()
