"""Adapting whole tiny causal LMs: targets, freezing, identity at init, learning."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qdora.core.adapt import AdapterSpec, adapt_model, adapter_layers, find_targets, layer_seed
from qdora.core.layer import QDoRALinear
from qdora.errors import QdoraError
from qdora.testing.oracle import bnb_quantized_model, oracle_logits
from qdora.testing.tiny_models import build_tiny_model


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_adapted_model_equals_quantized_base_at_init(tiny_llama_dir):
    ids = torch.randint(0, 300, (2, 24))
    model = load(tiny_llama_dir)
    report = adapt_model(model, AdapterSpec(adapter_dtype="float32"))
    assert len(report.adapted) == 2 * 7
    assert "lm_head" not in " ".join(report.adapted)
    ref = bnb_quantized_model(tiny_llama_dir)
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, oracle_logits(ref, ids), rtol=1e-5, atol=1e-5)


def test_only_adapters_are_trainable(tiny_llama_dir):
    model = load(tiny_llama_dir)
    report = adapt_model(model, AdapterSpec(r=4, target=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude") for n in trainable)
    assert report.target_names == ["q_proj", "v_proj"]
    hidden, r = model.config.hidden_size, 4
    kv = model.config.num_key_value_heads * (hidden // model.config.num_attention_heads)
    per_layer = (r * hidden + hidden * r + hidden) + (r * hidden + kv * r + kv)
    assert report.trainable_params == per_layer * model.config.num_hidden_layers


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_a_few_steps_lower_the_loss(tiny_llama_dir, method):
    model = load(tiny_llama_dir)
    adapt_model(model, AdapterSpec(method=method, r=8, alpha=16, adapter_dtype="float32"))
    ids = torch.randint(0, 300, (4, 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families(tmp_path, family):
    model_dir = build_tiny_model(tmp_path / family, family=family)
    model = load(model_dir)
    report = adapt_model(model, AdapterSpec(adapter_dtype="float32"))
    assert len(report.adapted) == 14
    layer = model.get_submodule(report.adapted[0])
    assert isinstance(layer, QDoRALinear)
    if family == "qwen2":  # q/k/v carry biases, kept as frozen passthrough
        q = model.get_submodule("model.layers.0.self_attn.q_proj")
        assert q.bias is not None and not q.bias.requires_grad
    ref = bnb_quantized_model(model_dir)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, oracle_logits(ref, ids), rtol=1e-5, atol=1e-5)


def test_targets_by_regex_and_comma_list(tiny_llama_dir):
    model = load(tiny_llama_dir)
    assert find_targets(model, r".*\.0\.mlp\..*") == [f"model.layers.0.mlp.{n}" for n in
                                                      ("gate_proj", "up_proj", "down_proj")]
    assert len(find_targets(model, "q_proj,k_proj")) == 4


def test_unknown_target_is_a_clear_error(tiny_llama_dir):
    model = load(tiny_llama_dir)
    with pytest.raises(QdoraError, match="no module .* matches target .*q_proj, up_proj, v_proj"):
        adapt_model(model, AdapterSpec(target=["query_key_value"]))
    assert not adapter_layers(model)


def test_model_without_decoder_blocks_is_a_clear_error():
    with pytest.raises(QdoraError, match="no decoder block list"):
        adapt_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), AdapterSpec())


def test_meta_model_gets_empty_meta_layers(tiny_llama_dir):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    adapt_model(model, AdapterSpec())
    layer = next(iter(adapter_layers(model).values()))
    assert layer.base.packed.device.type == "meta" and layer.lora_A.device.type == "meta"


def test_bad_spec_values():
    with pytest.raises(QdoraError, match="unknown method"):
        AdapterSpec(method="ia3")
    with pytest.raises(QdoraError, match="rank"):
        AdapterSpec(r=0)


def test_adapt_model_init_is_the_seeded_initial_adapter(tiny_llama_dir):
    """One init: layer i starts from initial_adapter(layer_seed(seed, i)), whatever the global RNG did."""
    spec = AdapterSpec(r=4, adapter_dtype="float32")
    models = []
    for torch_seed, seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(torch_seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        adapt_model(model, spec, seed=seed)
        models.append(adapter_layers(model))
    a, b, c = models
    for i, (path, layer) in enumerate(a.items()):
        expected = layer.initial_adapter(layer_seed(0, i))
        for name, t in layer.adapter_tensors().items():
            assert torch.equal(t, expected[name]) and torch.equal(b[path].adapter_tensors()[name], t), (path, name)
        assert not torch.equal(c[path].lora_A, layer.lora_A)  # another seed, another adapter
