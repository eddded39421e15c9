"""The weightless model folder and its random weight source stand in for a real checkpoint exactly."""

from __future__ import annotations

import torch

from benchmarks.gpu.synthetic import RandomWeights, write_model_dir


def test_random_weights_have_a_checkpoints_names_shapes_and_are_reproducible(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = write_model_dir(tmp_path / "m", "tiny")
    assert not list(d.glob("*.safetensors"))  # no weights on disk
    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)).state_dict()
    weights = RandomWeights(d, torch.device("cpu"))
    assert weights.keys() == list(real)
    for name in real:
        t = weights.get(name)
        assert tuple(t.shape) == tuple(real[name].shape), name
        assert torch.equal(t, weights.get(name)), name  # every rank makes the same tensor
    q, k = weights.get("model.layers.0.self_attn.q_proj.weight"), weights.get("model.layers.1.self_attn.q_proj.weight")
    assert q.dtype == torch.float32 and not torch.equal(q, k)
    assert weights.get("model.embed_tokens.weight").dtype == torch.bfloat16
    assert torch.all(weights.get("model.norm.weight") == 1)
