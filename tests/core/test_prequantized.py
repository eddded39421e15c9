"""Pre-quantized bitsandbytes NF4 checkpoints, written here by transformers + bitsandbytes themselves, load
bit for bit into qdora's NF4 storage and compute what transformers' 4-bit model computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from qdora.core.adapt import AdapterSpec, adapter_layers
from qdora.core.layer import NF4Linear, QDoRALinear
from qdora.core.load import load_model
from qdora.core.prequantized import base_double_quant, bnb_format, companion_of, quantized_weights
from qdora.errors import QdoraError
from qdora.testing.bnb_checkpoints import load_bnb_model, write_bnb_checkpoint
from qdora.testing.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("pq") / "fp32")


@pytest.fixture(scope="module")
def bnb_dir(src, tmp_path_factory):
    return write_bnb_checkpoint(src, tmp_path_factory.mktemp("pq") / "bnb")


def _nf4_modules(model):
    return {p: m.base for p, m in model.named_modules() if isinstance(m, (QDoRALinear, NF4Linear))}


def _file_tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_the_checkpoint_is_what_transformers_writes(bnb_dir):
    assert bnb_format(bnb_dir).double_quant and base_double_quant(bnb_dir)
    keys = _file_tensors(bnb_dir).keys()
    quantized = quantized_weights(keys)
    assert "model.layers.0.self_attn.q_proj.weight" in quantized and "lm_head.weight" not in quantized
    assert companion_of("model.layers.0.mlp.up_proj.weight.nested_absmax") == "model.layers.0.mlp.up_proj.weight"
    assert companion_of("model.layers.0.mlp.up_proj.weight") is None


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_bytes_are_the_checkpoints_and_logits_equal_transformers_4bit_model(bnb_dir, method):
    spec = AdapterSpec(method=method, r=4, adapter_dtype="float32", target=["q_proj", "v_proj", "down_proj"])
    model, _ = load_model(bnb_dir, spec, "cpu", torch.float32)
    stored = _file_tensors(bnb_dir)
    nf4 = _nf4_modules(model)
    assert len(nf4) == 14  # all 7 linears of both layers, adapted or not
    for path, w in nf4.items():
        key = path + ".weight"
        assert torch.equal(w.packed.view(torch.uint8).reshape(-1), stored[key].view(torch.uint8).reshape(-1))
        assert torch.equal(w.absmax.view(torch.uint8).reshape(-1), stored[key + ".absmax"])
        assert torch.equal(w.absmax2, stored[key + ".nested_absmax"])
        assert torch.equal(w.code, stored[key + ".quant_map"])
    # transformers' own 4-bit model of the same file; train mode keeps bitsandbytes on its exact fp32 path
    # (in eval mode on an AVX512-BF16 CPU it repacks the weights for a lower-precision kernel)
    ref = load_bnb_model(bnb_dir).train()
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_same_bytes_as_quantizing_the_full_precision_checkpoint(src, bnb_dir):
    """bitsandbytes quantized the file's bytes as qdora quantizes on load: both roads give one model."""
    spec = AdapterSpec(method="dora", r=4, adapter_dtype="float32")
    a, _ = load_model(src, spec, "cpu", torch.float32)
    b, _ = load_model(bnb_dir, spec, "cpu", torch.float32)
    for (pa, wa), (pb, wb) in zip(_nf4_modules(a).items(), _nf4_modules(b).items(), strict=True):
        assert pa == pb
        for name in ("packed", "absmax", "absmax2", "code2", "offset", "code", "row_norm_sq"):
            assert torch.equal(getattr(wa, name), getattr(wb, name)), (pa, name)
    for pa, la in adapter_layers(a).items():
        assert torch.equal(la.magnitude, adapter_layers(b)[pa].magnitude)


def test_without_double_quant(src, tmp_path):
    single = write_bnb_checkpoint(src, tmp_path / "bnb-single", double_quant=False)
    assert not base_double_quant(single)
    spec = AdapterSpec(method="dora", r=4, adapter_dtype="float32", double_quant=False)
    model, _ = load_model(single, spec, "cpu", torch.float32)
    ref = load_bnb_model(single).train()
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(QdoraError, match="double quantization"):
        load_model(single, AdapterSpec(method="dora", r=4, adapter_dtype="float32"), "cpu", torch.float32)


def test_other_quantizations_are_refused_clearly(src, tmp_path):
    for qc, match in (({"quant_method": "gptq"}, "quantized with 'gptq'"),
                      ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
                      ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "fp4")):
        d = tmp_path / qc.get("bnb_4bit_quant_type", qc["quant_method"] + str(qc.get("load_in_8bit", "")))
        d.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
        with pytest.raises(QdoraError, match=match):
            bnb_format(d)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sharded_under_fsdp2_trains_like_one_process_on_the_full_precision_source(src, bnb_dir, tmp_path):
    """2 gloo ranks (FSDP2, each rank fills its rows of the stored bytes) from the bnb checkpoint train like
    1 process from the full-precision checkpoint (same NF4 bytes, see above)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from qdora.testing.runs import SUBPROCESS_ENV, alpaca_data, metrics, small_config
    from qdora.train.distributed import free_port
    from qdora.train.loop import train

    data = alpaca_data(tmp_path)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "qdora.cli", "train", "--model", str(bnb_dir), "--data",
           str(data), "--max-steps", "3", "--seq-len", "128", "--rank", "4", "--alpha", "8", "--lr", "1e-2",
           "--dtype", "fp32", "--device", "cpu", "--micro-batch", "1", "--output", str(two)]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train(small_config(src, data, tmp_path / "one", max_steps=3, micro_batch=2, lr=1e-2))
    two_losses = {r["step"]: r["loss"] for r in metrics(two)}
    for step, loss in one.losses.items():
        assert abs(two_losses[step] - loss) <= 1e-5 * abs(loss), (step, two_losses[step], loss)
