"""Merging onto a pre-quantized bitsandbytes NF4 base: only the dequantized base exists, and the output
is the one the full-precision base's NF4 round trip gives (the same bytes), sized by output shapes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qdora.cli import main
from qdora.errors import QdoraError
from qdora.export.adapter_merge import AdapterMerge
from qdora.export.merge import merge_adapter, output_bytes
from qdora.testing.adapters import make_adapter
from qdora.testing.bnb_checkpoints import write_bnb_checkpoint
from qdora.testing.runs import alpaca_data
from qdora.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mq")
    src = build_tiny_model(root / "fp32")
    return src, write_bnb_checkpoint(src, root / "bnb")


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_merge_onto_bnb_base_equals_merge_onto_its_full_precision_source(models, tmp_path, method):
    src, bnb = models
    adapter = make_adapter(src, tmp_path / "adapter", method)
    a = merge_adapter(adapter, tmp_path / "from_fp32", base_model=src, dtype="fp32")
    b = merge_adapter(adapter, tmp_path / "from_bnb", base_model=bnb, dtype="fp32")
    assert b.prequantized_base and not a.prequantized_base
    assert (a.merged, a.dequantized) == (b.merged, b.dequantized) == (14, 0)
    ta, tb = load_file(str(a.output / "model.safetensors")), load_file(str(b.output / "model.safetensors"))
    assert ta.keys() == tb.keys()  # no quant-state companions in the output
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert "quantization_config" not in json.loads((b.output / "config.json").read_text())


def test_output_size_follows_output_shapes(models, tmp_path):
    src, bnb = models
    adapter = make_adapter(src, tmp_path / "adapter", "dora")
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        plan = AdapterMerge.load(adapter, bnb)
        estimate = output_bytes(plan.reader, plan.base_dir, torch_dtype, plan.headers())
        res = merge_adapter(adapter, tmp_path / f"out-{dtype}", base_model=bnb, dtype=dtype)
        written = sum(f.stat().st_size for f in res.output.iterdir())
        assert written <= estimate <= written + 256 * 64, (written, estimate)
        # the packed bytes' shapes would have given a quarter (fp32) of the real size
        assert estimate > output_bytes(plan.reader, plan.base_dir, torch_dtype)


def test_base_original_is_refused_before_anything_is_written(models, tmp_path):
    src, bnb = models
    adapter = make_adapter(src, tmp_path / "adapter", "dora")
    with pytest.raises(QdoraError, match="pre-quantized bitsandbytes NF4 checkpoint.*--base original is impossible"):
        merge_adapter(adapter, tmp_path / "out", base_model=bnb, base="original")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_from_bnb_checkpoint_then_merge_says_so(models, tmp_path):
    _, bnb = models
    out = tmp_path / "run"
    train = CliRunner().invoke(main, ["train", "--model", str(bnb), "--data", str(alpaca_data(tmp_path)),
                                      "--output", str(out), "--max-steps", "2", "--seq-len", "128", "--rank", "4",
                                      "--dtype", "fp32", "--device", "cpu"])
    assert train.exit_code == 0, train.output
    merged = CliRunner().invoke(main, ["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert "pre-quantized bitsandbytes NF4 checkpoint: merged onto its dequantized weights" in merged.output
    refused = CliRunner().invoke(main, ["merge", "--adapter", str(out), "--output", str(tmp_path / "m2"),
                                        "--base", "original"])
    assert refused.exit_code == 1 and "--base original is impossible" in refused.output
    assert not (tmp_path / "m2").exists()
