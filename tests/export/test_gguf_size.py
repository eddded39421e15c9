"""The free-space check's GGUF sizes: a close lower bound of the real file, and a quantization estimate
below llama.cpp's real output (a refusal must never stop an export that would fit)."""

from __future__ import annotations

import importlib.util

import pytest

from qdora.export.gguf_config import read_spec
from qdora.export.gguf_export import export_gguf
from qdora.export.gguf_size import gguf_bytes, quantized_bytes
from qdora.export.gguf_tensors import plan_tensors


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_gguf_bytes_is_a_close_lower_bound(tiny_llama_dir, tmp_path, outtype):
    planned = gguf_bytes(plan_tensors(read_spec(tiny_llama_dir), outtype))
    real = export_gguf(tiny_llama_dir, tmp_path / "m.gguf", outtype=outtype).stat().st_size
    assert planned <= real <= planned + 64 * 1024  # only the vocabulary metadata is left out


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0"])
def test_quantized_estimate_does_not_exceed_the_real_file(tiny_llama_dir, tmp_path, qtype):
    plans = plan_tensors(read_spec(tiny_llama_dir), "f16")
    out = export_gguf(tiny_llama_dir, tmp_path / "m.gguf", quantize=qtype)
    assert 0 < quantized_bytes(plans, qtype) <= out.stat().st_size
