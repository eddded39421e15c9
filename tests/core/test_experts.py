"""NF4Experts against references: transformers' own model on the NF4 round trip (at init), plain
autograd on the dequantized weights (forward, dA, dB, dm, dx per expert), and PEFT's LoRA on fused expert
parameters (`target_parameters`) loading an adapter qdora wrote."""

from __future__ import annotations

import pytest
import torch

from qdora.core.adapt import AdapterSpec, adapt_model, adapter_layers
from qdora.core.adapter_io import save_adapter
from qdora.core.experts import NF4Experts, experts_modules
from qdora.core.layer import merge_weight
from qdora.core.load import load_model
from qdora.errors import QdoraError
from qdora.testing.tiny_models import build_tiny_model
from qdora.testing.tiny_moe import dequantized_reference

FAMILIES = {"qwen3_moe": "qwen2", "mixtral": "llama3", "qwen2_moe": "qwen2"}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: build_tiny_model(root / f, family=f, tokenizer=t, seed=1, initializer_range=0.2)
            for f, t in FAMILIES.items()}


def _randomize(model, seed=0, scale=0.3):
    """Non-zero adapters (B = 0 at init would hide every adapter term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters():
                p.mul_(1 + scale * torch.randn(p.shape, generator=g)) if p is layer.magnitude else \
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loaded_model_equals_transformers_on_the_nf4_round_trip(moe_dirs, family):
    ref = dequantized_reference(moe_dirs[family])
    model, _ = load_model(moe_dirs[family], AdapterSpec(r=4, alpha=8, target="all-linear,experts",
                                                        adapter_dtype="float32"), "cpu", torch.float32)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()
    assert len(experts_modules(model)) == 2
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("gate.weight"))


def _dense_reference(experts: NF4Experts, x, top_k_index, top_k_weights):
    """Plain autograd over dequantized per-expert weights: y = Σ_k w_k · down(act(gate_up(x)))."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        tok, slot = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        h = x[tok]
        for param in ("gate_up_proj", "down_proj"):
            w = torch.cat([p.dequantize(torch.float32) for p in experts.part_weights(e, param)])
            ad = experts.adapter(param)
            m = ad.magnitude[e] if ad.magnitude is not None else None
            wd = w + ad.scale * ad.lora_B[e] @ ad.lora_A[e]
            y = h @ wd.t()
            if m is not None:
                y = y * (m / wd.norm(dim=1).detach())
            if param == "gate_up_proj":
                g, u = y.chunk(2, dim=-1)
                h = experts.act_fn(g) * u
            else:
                h = y
        out = out.index_add(0, tok, h * top_k_weights[tok, slot, None])
    return out


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_forward_and_every_gradient_match_plain_autograd(moe_dirs, method):
    model, _ = load_model(moe_dirs["qwen3_moe"], AdapterSpec(method=method, r=4, alpha=8, target="experts",
                                                             adapter_dtype="float32"), "cpu", torch.float32)
    _randomize(model)
    experts = next(iter(experts_modules(model).values()))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, experts.hidden_dim, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(24)])
    idx[:, 0] = torch.where(idx[:, 0] == 3, 0, idx[:, 0])  # expert 3 rarer than the others
    w = torch.softmax(torch.randn(24, 2, generator=g), -1)
    dy = torch.randn(24, experts.hidden_dim, generator=g)
    params = [p for param in ("gate_up_proj", "down_proj") for p in experts.adapter(param).adapter_parameters()]

    y = experts(x, idx, w)
    grads = torch.autograd.grad(y, [x, *params], dy)
    y_ref = _dense_reference(experts, x, idx, w)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):  # fp32 summation order only
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_merged_weight_is_the_per_expert_dora_merge(moe_dirs):
    model, _ = load_model(moe_dirs["mixtral"], AdapterSpec(r=4, alpha=8, target="experts.gate_up_proj",
                                                           adapter_dtype="float32"), "cpu", torch.float32)
    _randomize(model)
    experts = next(iter(experts_modules(model).values()))
    assert experts.adapter("down_proj") is None
    ad = experts.adapter("gate_up_proj")
    w = torch.cat([p.dequantize(torch.float32) for p in experts.part_weights(2, "gate_up_proj")])
    want = merge_weight(w, ad.lora_A[2], ad.lora_B[2], ad.magnitude[2], ad.scale)
    torch.testing.assert_close(experts.merged_weight(2, "gate_up_proj"), want)


def test_peft_loads_a_qdora_expert_lora_adapter_and_computes_the_same_logits(moe_dirs, tmp_path):
    """PEFT (target_parameters) is the oracle for the key names, the tensor layouts and the math."""
    from peft import PeftModel

    spec = AdapterSpec(method="lora", r=4, alpha=8, target="q_proj,v_proj,experts", adapter_dtype="float32")
    for family in ("qwen3_moe", "mixtral"):
        model, _ = load_model(moe_dirs[family], spec, "cpu", torch.float32)
        _randomize(model, seed=2)
        out = save_adapter(model, tmp_path / family, spec, base_model=str(moe_dirs[family]))
        peft_model = PeftModel.from_pretrained(dequantized_reference(moe_dirs[family]), out).eval()
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours, theirs = model(ids).logits, peft_model(ids).logits
        assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max(), family


def test_adapting_a_full_precision_model_quantizes_each_expert_tensor(moe_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dirs["qwen2_moe"], dtype=torch.float32)
    ref = dequantized_reference(moe_dirs["qwen2_moe"])
    report = adapt_model(model, AdapterSpec(r=4, alpha=8, target="all-linear", adapter_dtype="float32"))
    assert not any("shared_expert_gate" in p for p in report.adapted)  # a gate: kept in full precision
    assert isinstance(model.model.layers[0].mlp.shared_expert_gate, torch.nn.Linear)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_an_unsupported_moe_family_is_refused_before_loading(tmp_path):
    from transformers import OlmoeConfig

    from qdora.core.load import build_meta_model

    cfg = OlmoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(QdoraError, match="mixture-of-experts model qdora does not support.*mixtral"):
        build_meta_model(tmp_path, AdapterSpec(), torch.float32)
