"""Every family end to end through the real CLI: `qdora train` a few steps, `qdora merge`, `qdora export`
f32, then the merged model in real llama.cpp against transformers: identical tokenization, logits within
the family's tolerance (relative to the largest |logit|), identical greedy continuations.

Tolerance: f32 1e-4 (measured ~1e-6: float32 summation order).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.testing.family_cases import build_case
from qdora.testing.runs import chat_data

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.export.test_gguf_llamacpp import PROMPTS, TEXTS, LlamaCpp, Reference, _rel_diff  # noqa: E402

FAMILY_CASES = ["qwen3", "qwen3_untied"]
REL_TOL = {}  # case -> looser f32 bound, each justified where it is set
LONG_PROMPT = "The red cat sees the owl near the river and the fox counts forty two stars in the night sky"


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def train_merge_export(base: Path, tmp: Path) -> tuple[Path, Path]:
    """The user's path: train a few steps (fp32, CPU), merge in fp32, export f32."""
    run_cli("train", "--model", str(base), "--data", str(chat_data(tmp)), "--output", str(tmp / "run"),
            "--rank", "4", "--alpha", "8", "--lr", "3e-2", "--seq-len", "64", "--micro-batch", "2",
            "--max-steps", "2", "--dtype", "fp32", "--device", "cpu")
    run_cli("merge", "--adapter", str(tmp / "run"), "--output", str(tmp / "merged"), "--dtype", "fp32")
    run_cli("export", "--model", str(tmp / "merged"), "--output", str(tmp / "model.gguf"), "--outtype", "f32")
    return tmp / "merged", tmp / "model.gguf"


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_trained_merged_exported_matches_transformers(tmp_path, case):
    merged, gguf_path = train_merge_export(build_case(case, tmp_path / "base"), tmp_path)
    ref = Reference(merged)
    cpp = LlamaCpp(gguf_path)
    try:
        for text in TEXTS:
            assert cpp.tokenize(text) == ref.tok(text)["input_ids"], text
            assert cpp.tokenize(text, add_bos=False) == ref.tok(text, add_special_tokens=False)["input_ids"]
        messages = [{"role": "user", "content": "What colour is the fox?"}]
        chat = ref.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert cpp.tokenize(chat, add_bos=False, special=True) == ref.tok(chat, add_special_tokens=False)["input_ids"]
        for prompt in [*PROMPTS, LONG_PROMPT]:
            ids = ref.tok(prompt)["input_ids"]
            hf, ours = ref.logits(ids), cpp.logits(ids)
            assert _rel_diff(hf, ours) <= REL_TOL.get(case, 1e-4), prompt
            assert cpp.greedy(ids) == ref.greedy(ids), prompt
    finally:
        cpp.close()
