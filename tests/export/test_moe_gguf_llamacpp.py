"""Trained-looking MoE adapters merged and exported to GGUF, checked in real llama.cpp against transformers
on the merged model: the layout llama.cpp's converter writes (experts stacked into ffn_*_exps, router
ffn_gate_inp in F32, expert counts and sizes in the metadata; Mixtral as the llama arch), tokenization,
logits within 1e-4 (f32), the same greedy continuation; the one-step `export --adapter` writes the same
bytes as merge + export."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.testing.adapters import make_adapter
from qdora.testing.llamacpp_oracle import PROMPTS, TEXTS, LlamaCpp, Reference, rel_diff
from qdora.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = {  # family: (tokenizer, GGUF arch, adapter method, target)
    "qwen3_moe": ("qwen2", "qwen3moe", "dora", "all-linear,experts"),
    "mixtral": ("sentencepiece", "llama", "dora", "experts,q_proj,o_proj"),
    "qwen2_moe": ("qwen2", "qwen2moe", "lora", "all-linear,experts"),
}


def _cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("family", list(CASES))
def test_merged_moe_runs_in_llamacpp_as_in_transformers(tmp_path, family):
    tokenizer, arch, method, target = CASES[family]
    base = build_tiny_model(tmp_path / "base", family=family, tokenizer=tokenizer, seed=1, initializer_range=0.2)
    adapter = make_adapter(base, tmp_path / "adapter", method, target=target)
    merged = tmp_path / "merged"
    _cli("merge", "--adapter", adapter, "--output", merged, "--dtype", "fp32")
    path = tmp_path / "m.gguf"
    _cli("export", "--model", merged, "--output", path, "--outtype", "f32")

    reader = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.")}
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.expert_count"] == 4 and fields[f"{arch}.expert_used_count"] == 2
    tensors = {t.name: t for t in reader.tensors}
    hidden, inter = 64, (128 if family == "mixtral" else 64)
    for proj, shape in (("gate", (4, inter, hidden)), ("up", (4, inter, hidden)), ("down", (4, hidden, inter))):
        t = tensors[f"blk.1.ffn_{proj}_exps.weight"]
        assert tuple(reversed(t.shape.tolist())) == shape, proj
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not any(".experts." in n or "ffn_gate.weight" in n for n in tensors if family != "qwen2_moe")
    if family == "qwen2_moe":
        assert fields["qwen2moe.expert_shared_feed_forward_length"] == 128
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"].shape.tolist() == [hidden]
    else:
        assert fields.get(f"{arch}.expert_feed_forward_length", inter) == inter

    ref, cpp = Reference(merged), LlamaCpp(path)
    try:
        for text in TEXTS:
            assert cpp.tokenize(text) == ref.tok(text)["input_ids"], text
        for prompt in PROMPTS:
            ids = ref.tok(prompt)["input_ids"]
            assert rel_diff(cpp.logits(ids), ref.logits(ids)) <= 1e-4
            assert cpp.greedy(ids) == ref.greedy(ids), prompt
    finally:
        cpp.close()

    one_step = tmp_path / "one.gguf"
    _cli("export", "--adapter", adapter, "--output", one_step, "--outtype", "f32", "--dtype", "fp32")
    renamed = tmp_path / "named.gguf"  # general.name is the adapter folder's name in the one-step file
    from qdora.export.gguf_export import export_gguf

    export_gguf(merged, renamed, outtype="f32", name="adapter")
    assert one_step.read_bytes() == renamed.read_bytes()


def test_q8_0_stacked_experts_equal_llamacpps_own_quantization(tmp_path):
    """Stacking expert by expert gives the bytes of quantizing the stacked tensor (rows encode alone)."""
    base = build_tiny_model(tmp_path / "base", family="qwen3_moe", tokenizer="qwen2", seed=1,
                            initializer_range=0.2)
    path = tmp_path / "q8.gguf"
    _cli("export", "--model", base, "--output", path, "--outtype", "q8_0")
    f32 = tmp_path / "f32.gguf"
    _cli("export", "--model", base, "--output", f32, "--outtype", "f32")
    ours = {t.name: t for t in gguf.GGUFReader(path).tensors}
    full = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    t = full["blk.0.ffn_down_exps.weight"]
    stacked = np.asarray(t.data, dtype=np.float32)
    want = gguf.quants.quantize(stacked, gguf.GGMLQuantizationType.Q8_0)
    assert np.asarray(ours["blk.0.ffn_down_exps.weight"].data).tobytes() == want.tobytes()
