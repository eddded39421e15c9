"""The tiny local tokenizers and config overrides the export tests rely on."""

from __future__ import annotations

import json

import pytest

from qdora.testing.tiny_models import build_tiny_model
from qdora.testing.tiny_tokenizers import build_tokenizer

TEXT = " Hello world!  The red cat counts 12345 stars.\n\nnaïve café 😀"


@pytest.mark.parametrize("kind", ["llama3", "sentencepiece", "qwen2"])
def test_tokenizers_round_trip(kind):
    tok = build_tokenizer(kind)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges were learned


def test_sentencepiece_layout():
    tok = build_tokenizer("sentencepiece")
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]
    ids = tok("é")["input_ids"]  # not a piece: byte fallback
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁", "<0xC3>", "<0xA9>"]


def test_qwen2_digits_and_specials():
    tok = build_tokenizer("qwen2")
    pieces = tok.convert_ids_to_tokens(tok("in 2024")["input_ids"])
    assert pieces[-4:] == ["2", "0", "2", "4"]  # one digit per piece
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == len(tok) - 3  # specials after the learned vocab


@pytest.mark.parametrize("kind", ["sentencepiece", "qwen2"])
def test_config_ids_follow_the_tokenizer(tmp_path, kind):
    d = build_tiny_model(tmp_path, tokenizer=kind)
    cfg = json.loads((d / "config.json").read_text())
    tok = build_tokenizer(kind)
    assert cfg["eos_token_id"] == tok.eos_token_id
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] > len(tok)


def test_tied_embeddings_and_llama3_rope_overrides(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    d = build_tiny_model(tmp_path, tie_word_embeddings=True, rope_scaling=rope)
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 8.0
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
