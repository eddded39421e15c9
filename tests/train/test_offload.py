"""Hidden-state offload: gradients bit-identical to the plain path, parameters never moved, small tensors
left alone, and a no-op on CPU unless the bookkeeping is exercised with copy_on_cpu."""

from __future__ import annotations

import pytest
import torch

from qdora.core.adapt import AdapterSpec, adapt_model
from qdora.train.distributed import enable_gradient_checkpointing
from qdora.train.offload import HiddenStateOffload


def _model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    adapt_model(model, AdapterSpec(r=4, adapter_dtype="float32"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    enable_gradient_checkpointing(model)
    model.train()
    return model


def _step(model, ids, hooks=None):
    model.zero_grad(set_to_none=True)
    if hooks is None:
        loss = model(input_ids=ids, labels=ids).loss
    else:
        with hooks:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_offloaded_grads_are_bit_identical(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = _step(model, ids)
    shipped: list[torch.Tensor] = []

    class Spy(HiddenStateOffload):
        def _pack(self, t):
            packed = super()._pack(t)
            if packed is not t:
                shipped.append(t)
            return packed

    hooks = Spy(torch.device("cpu"), min_bytes=0, copy_on_cpu=True)
    loss, got = _step(model, ids, hooks)
    assert torch.equal(loss, ref_loss) and ref.keys() == got.keys()
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    # the layer inputs (2 layers × [2, 32, 64] fp32) at least went through the host copies
    assert hooks.offloaded_bytes >= 2 * 2 * 32 * 64 * 4
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert shipped and not any(t.untyped_storage().data_ptr() in params for t in shipped)  # lm_head stays


@pytest.mark.slow
def test_noop_on_cpu_and_small_tensors_stay(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    ref_loss, ref = _step(model, ids)
    plain = HiddenStateOffload(torch.device("cpu"), min_bytes=0)
    loss, got = _step(model, ids, plain)
    assert plain.offloaded_bytes == 0 and torch.equal(loss, ref_loss)
    big_only = HiddenStateOffload(torch.device("cpu"), min_bytes=1 << 30, copy_on_cpu=True)
    _step(model, ids, big_only)
    assert big_only.offloaded_bytes == 0
