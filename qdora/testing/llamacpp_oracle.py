"""llama.cpp (llama-cpp-python) and transformers side by side: the oracle the GGUF export tests compare with.

Shared by the export tests so that they do not import each other. llama-cpp-python is imported when a
GGUF is loaded: a missing one is a loud error in the test that needs it, never a skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Texts that exercise the pre-tokenizers: digits, unicode, whitespace runs, contractions, punctuation.
TEXTS = [
    "Hello world",
    "The red cat sees 12345 stars, 3.14159 and 1,000,000.",
    "naïve café — Ünïcödé 😀 日本語!",
    "  two leading spaces and trailing  ",
    "lines\nand\n\nblank lines\r\n\ttabs",
    "don't you'll WE'VE (x+y)*z; a_b-c",
    " What colour is the fox?",
]
PROMPTS = ["The red cat sees the", "What colour is the owl? The owl"]
F32 = 0  # GGML_TYPE_F32 for llama.cpp's KV cache (its f16 default would add its own rounding)


class Reference:
    """transformers' tokenizer and model for one folder."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model(torch.tensor([ids])).logits[0].numpy()

    def greedy(self, ids: list[int], n: int = 10) -> list[int]:
        seq = list(ids)
        for _ in range(n):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(ids):]


class LlamaCpp:
    """A GGUF loaded in llama.cpp, evaluated token by token with all logits kept."""

    def __init__(self, path: Path):
        import llama_cpp

        self.llm = llama_cpp.Llama(
            str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False, type_k=F32, type_v=F32
        )

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)])

    def greedy(self, ids: list[int], n: int = 10) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval(out[-1:])
        return out

    def close(self) -> None:
        self.llm.close()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| relative to the largest |a|."""
    return float(np.abs(a - b).max() / np.abs(a).max())


def assert_same_tokenization(cpp: LlamaCpp, tok, texts: list[str]) -> None:
    """llama.cpp tokenizes like the HF tokenizer: with and without BOS, and special tokens inside a chat prompt."""
    for text in texts:
        assert cpp.tokenize(text) == tok(text)["input_ids"], text
        assert cpp.tokenize(text, add_bos=False) == tok(text, add_special_tokens=False)["input_ids"], text
    messages = [{"role": "user", "content": "What colour is the fox?"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert cpp.tokenize(chat, add_bos=False, special=True) == tok(chat, add_special_tokens=False)["input_ids"]
