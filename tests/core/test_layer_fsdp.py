"""FSDP2 shards the NF4 layer: 2 gloo ranks on CPU give bit-identical bytes and the single-process step."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from qdora.core.adapt import adapter_layers
from qdora.testing.fsdp_layer_worker import batch, build, step, worker
from qdora.train.distributed import free_port

pytestmark = pytest.mark.slow  # two spawned ranks


def spawn(tiny_llama_dir, tmp_path, mp_bf16: bool) -> None:
    mp.spawn(worker, args=(2, str(tiny_llama_dir), str(tmp_path), free_port(), mp_bf16), nprocs=2, join=True)


def test_two_ranks_shard_gather_and_step_like_one_process(tiny_llama_dir, tmp_path):
    spawn(tiny_llama_dir, tmp_path, mp_bf16=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    ref = build(str(tiny_llama_dir), mp_bf16=False)
    ref_packed = {p: layer.base.packed.data for p, layer in adapter_layers(ref).items()}
    for r in ranks:
        for path, full in r["packed"].items():
            assert full.dtype == ref_packed[path].dtype
            assert torch.equal(full, ref_packed[path]), f"{path}: gathered bytes differ"
            assert r["local_rows"][path] < full.shape[0]  # really sharded, not replicated

    ids = batch(str(tiny_llama_dir))
    ref_loss = step(ref, ids, ids[:, 1:].numel()) / ids[:, 1:].numel()
    for r in ranks:
        assert abs(r["loss"].item() - ref_loss.item()) <= 1e-5
    for path, layer in adapter_layers(ref).items():
        for name, t in layer.adapter_tensors().items():
            torch.testing.assert_close(ranks[0]["grads"][f"{path}.{name}"], t.grad, rtol=1e-4, atol=1e-7)


def test_bf16_mixed_precision_leaves_nf4_bytes_alone(tiny_llama_dir, tmp_path):
    """MixedPrecisionPolicy(bf16) casts floating params; uint8 NF4 bytes must come through untouched."""
    spawn(tiny_llama_dir, tmp_path, mp_bf16=True)
    ref = build(str(tiny_llama_dir), mp_bf16=True)
    ids = batch(str(tiny_llama_dir))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(ids).logits.float()
    got = torch.cat([torch.load(tmp_path / f"mp-rank{r}.pt")["logits"] for r in range(2)])
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 2e-2, rel  # bf16 compute both ways; corrupted NF4 bytes would give O(1) errors
