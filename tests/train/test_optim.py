"""Optimizer choice, clipping and spike detection: against torch's own clipping on a hand-made case,
bitsandbytes' 8-bit AdamW on CPU (state save/load bit-exact), paged refused on CPU, spike rule."""

from __future__ import annotations

import math

import pytest
import torch

from qdora.errors import QdoraError
from qdora.train.optim import SpikeGuard, build_optimizer, check_optimizer, clip_gradients, grad_norm


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(64, 64, generator=g)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return ps


def test_clip_scales_to_max_norm_and_returns_the_norm_before():
    ps = _params()
    before = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps))
    ref = [p.grad.clone() for p in ps]
    norm = clip_gradients(ps, 1.0)
    assert norm.item() == pytest.approx(before, rel=1e-6)
    after = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps))
    assert after == pytest.approx(1.0, rel=1e-5)
    assert all(torch.allclose(p.grad, r * (1.0 / (before + 1e-6)), rtol=1e-6) for p, r in zip(ps, ref, strict=True))
    ps = _params()
    ref = [p.grad.clone() for p in ps]
    assert clip_gradients(ps, 0.0).item() == pytest.approx(before, rel=1e-6)  # 0: measure, do not touch
    assert all(torch.equal(p.grad, r) for p, r in zip(ps, ref, strict=True))
    assert clip_gradients(ps, 1e9).item() == pytest.approx(before, rel=1e-6)
    assert all(torch.equal(p.grad, r) for p, r in zip(ps, ref, strict=True))  # under the limit: unchanged
    assert grad_norm([torch.nn.Parameter(torch.ones(2))]).item() == 0.0


@pytest.mark.parametrize("name", ["adamw", pytest.param("adamw8bit", marks=pytest.mark.slow),
                                  pytest.param("paged_adamw8bit", marks=pytest.mark.slow)])
def test_optimizers_run_on_cpu_and_resume_bit_exactly(name):
    def run(steps, opt_state=None, weights=None):
        p = torch.nn.Parameter(weights.clone() if weights is not None else torch.randn(
            4096, 8, generator=torch.Generator().manual_seed(0)))
        opt = build_optimizer([p], name, 1e-2, 0.01, torch.device("cpu"))
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for i in range(steps):
            seed = 100 + i + (2 if opt_state is not None else 0)
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
            opt.step()
        return p.detach().clone(), opt.state_dict()

    full, _ = run(4)
    half, state = run(2)
    resumed, _ = run(2, state, half)
    assert torch.equal(resumed, full)
    if name != "adamw":
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(4096))], name, 1e-3, 0.0, torch.device("cpu"))
        assert type(opt).__name__ == {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}[name]
        assert opt.state == {} or all(v.dtype == torch.uint8 for s in opt.state.values() for k, v in s.items()
                                      if k.startswith("state"))


def test_sharded_8bit_refused_clearly_and_paged_warned_on_cpu(caplog):
    with caplog.at_level("WARNING", logger="qdora.train.optim"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], "paged_adamw8bit", 1e-3, 0.0, torch.device("cpu"))
    assert "only on CUDA" in caplog.text
    with pytest.raises(QdoraError, match="FSDP2"):
        check_optimizer("paged_adamw8bit", torch.device("cpu"), True)
    with pytest.raises(QdoraError, match="FSDP2"):
        check_optimizer("adamw8bit", torch.device("cpu"), True)
    check_optimizer("adamw", torch.device("cpu"), True)
    check_optimizer("adamw8bit", torch.device("cpu"), False)


def test_spike_guard():
    g = SpikeGuard(3.0, window=4, min_steps=3)
    assert not g.is_spike(100.0)  # too early to judge
    for x in (2.0, 2.2, 1.8):
        g.record(x)
    assert g.is_spike(6.1) and not g.is_spike(5.9) and g.is_spike(float("nan"))
    for x in (1.0, 1.0, 1.0):
        g.record(x)
    assert g.history == [2.2, 1.8, 1.0, 1.0, 1.0][-4:] and g.median() == 1.0
    h = SpikeGuard(3.0, window=4, min_steps=3)
    h.load_state_dict(g.state_dict())
    assert h.history == g.history and h.is_spike(3.5) == g.is_spike(3.5)
    assert not SpikeGuard(0.0).is_spike(1e9) and SpikeGuard(0.0).is_spike(float("inf"))


@pytest.mark.slow
def test_bnb_state_round_trips_through_a_flat_json_and_tensor_layout():
    """What the checkpoint writes (tensors apart, the rest JSON) loads back into a fresh 8-bit AdamW and the
    next steps are bit-identical to the uninterrupted optimizer's."""
    import json

    from qdora.train.optim import bnb_state_dict, is_bnb, load_bnb_state_dict

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 3))

    def step(m, opt, seed):
        m(torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    a = model()
    opt_a = build_optimizer(list(a.parameters()), "adamw8bit", 1e-2, 0.01, torch.device("cpu"))
    assert is_bnb(opt_a)
    step(a, opt_a, 0)
    sd = bnb_state_dict(a, opt_a)
    tensors = {(n, k): v for n, vals in sd["state"].items() for k, v in vals.items() if torch.is_tensor(v)}
    rest = json.loads(json.dumps({"param_groups": sd["param_groups"],
                                  "state": {n: {k: v for k, v in vals.items() if not torch.is_tensor(v)}
                                            for n, vals in sd["state"].items()}}))
    assert any(v.dtype == torch.uint8 for v in tensors.values())  # the 8-bit moments
    for (n, k), v in tensors.items():
        rest["state"][n][k] = v
    b = model()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(list(b.parameters()), "adamw8bit", 1e-2, 0.01, torch.device("cpu"))
    load_bnb_state_dict(b, opt_b, rest)
    for seed in (1, 2):
        step(a, opt_a, seed)
        step(b, opt_b, seed)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
