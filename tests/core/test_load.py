"""Streaming load equals transformers' load + adapt_model, for single, index-sharded and tied checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qdora.core.adapt import AdapterSpec, adapt_model, adapter_layers
from qdora.core.load import load_model
from qdora.errors import QdoraError
from qdora.testing.tiny_models import build_tiny_model

SPEC = AdapterSpec(r=4, alpha=8, adapter_dtype="float32")


def reference(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapt_model(model, SPEC, seed=0)  # the same initial adapters as load_model(seed=0)
    return model


def assert_same_model(streamed, ref):
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, ref(ids).logits)
    ours, theirs = streamed.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_model_equals_from_pretrained_plus_adapt(tmp_path, tie):
    d = build_tiny_model(tmp_path / "m", tie_word_embeddings=tie)
    streamed, report = load_model(d, SPEC, "cpu", torch.float32, seed=0)
    assert len(report.adapted) == 14
    assert streamed.model.rotary_emb.inv_freq.device.type == "cpu"
    assert_same_model(streamed, reference(d))


def test_index_sharded_checkpoint(tmp_path):
    d = build_tiny_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in d.iterdir():
        if f.name.startswith("tokenizer"):
            (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    streamed, _ = load_model(sharded, SPEC, "cpu", torch.float32, seed=0)
    assert_same_model(streamed, reference(d))


def test_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = build_tiny_model(tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QdoraError, match="lacks 2 tensors.*up_proj"):
        load_model(d, SPEC, "cpu", torch.float32)


def test_bf16_compute_keeps_adapters_fp32(tmp_path):
    d = build_tiny_model(tmp_path / "m")
    streamed, _ = load_model(d, SPEC, "cpu", torch.bfloat16)
    assert streamed.model.embed_tokens.weight.dtype == torch.bfloat16
    layer = next(iter(adapter_layers(streamed).values()))
    assert layer.lora_A.dtype == torch.float32 and layer.base.packed.dtype in (torch.uint8, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_host_embedding_and_nf4_head(tmp_path, tie):
    """embeddings=host loads exactly the plain model; lm_head=nf4 exactly the plain model whose head is
    quantized the same way (a tied checkpoint fills both from its one embedding tensor)."""
    from qdora.core.frozen_parts import place_frozen_parts
    from qdora.core.host_embedding import HostEmbedding
    from qdora.core.layer import NF4Linear
    from qdora.core.load import build_meta_model, load_weights
    from qdora.core.nf4_head import lm_head_to_nf4

    d = build_tiny_model(tmp_path / "m", tie_word_embeddings=tie)
    ref = reference(d)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for lm_head in ("dense", "nf4"):
        model, _ = build_meta_model(d, SPEC, torch.float32)
        place_frozen_parts(model, lm_head, "host", "cpu", torch.float32)
        load_weights(model, d, "cpu", seed=0)
        assert isinstance(model.get_input_embeddings(), HostEmbedding)
        assert isinstance(model.lm_head, NF4Linear) == (lm_head == "nf4")
        if lm_head == "nf4":
            lm_head_to_nf4(ref)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits), lm_head
