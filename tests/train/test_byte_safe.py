"""Byte safety of the FSDP2 policy (qdora/train/distributed.py) and the process group backend.

On torch < 2.13 NF4 bytes are bf16 views, and CUDA's bf16 `_foreach_copy_` (FSDP2's all-gather copy-in)
rewrites NaN bit patterns; CPU copies keep them, so a CPU run cannot show the corruption itself. What
the CPU can show is the mechanism that avoids it: FSDP2 all-gathers a group as raw bytes (uint8) exactly
when its inputs' dtypes differ, and asking FSDP2's own code which dtype it will gather in proves the
policy gives every group holding NF4 bytes mixed dtypes. The storage check of the GPU check
(`benchmarks/gpu/storage_check.py`) then proves the bits on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from qdora.errors import QdoraError
from qdora.train.distributed import BACKEND_ENV, check_byte_safe, free_port, process_group_backend, shard_model


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield
    dist.destroy_process_group()


def _tiny(storage: str, monkeypatch):
    monkeypatch.setenv("QDORA_NF4_STORAGE", storage)
    from benchmarks.bench_model import build_qdora
    from qdora.tools.presets import preset_config

    model = build_qdora(preset_config("tiny"), "dora", 4, 8.0, torch.device("cpu"), torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.base.packed.dtype == getattr(torch, storage)
    return model


def _step(model) -> None:
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()


def _gather_dtypes(model) -> dict[str, torch.dtype]:
    """The dtype FSDP2's own code picks for each group's all-gather buffer (groups sharded, after a step)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
        _get_all_gather_input_metadatas,
        _get_param_all_gather_inputs,
    )

    out = {}
    for path, mod in model.named_modules():
        state = mod._get_fsdp_state() if hasattr(mod, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None)
        if group is not None:
            out[path or "(root)"] = _get_all_gather_input_metadatas(_get_param_all_gather_inputs(group.fsdp_params))[2]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["bfloat16", "uint8"])
def test_groups_with_nf4_bytes_gather_raw_bytes(storage, one_rank_group, monkeypatch):
    model = _tiny(storage, monkeypatch)
    shard_model(model, torch.bfloat16, offload_params=False)
    _step(model)
    dtypes = _gather_dtypes(model)
    blocks = {k: v for k, v in dtypes.items() if ".layers." in k}
    assert len(blocks) == model.config.num_hidden_layers
    assert set(blocks.values()) == {torch.uint8}, dtypes


@pytest.mark.slow
def test_an_all_bf16_policy_would_gather_bf16_and_is_refused(one_rank_group, monkeypatch):
    """The configuration that corrupts on CUDA: MixedPrecisionPolicy(bf16) over bf16-viewed bytes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _tiny("bfloat16", monkeypatch)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    with pytest.raises(QdoraError, match="all-gather .*NF4 bytes .* as bf16"):
        check_byte_safe(model)
    _step(model)
    assert {v for k, v in _gather_dtypes(model).items() if ".layers." in k} == {torch.bfloat16}


def test_bf16_adapters_beside_bf16_bytes_are_refused(one_rank_group, monkeypatch):
    """Without a policy, a group whose adapters are bf16 too would gather uniformly in bf16."""
    model = _tiny("bfloat16", monkeypatch)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    with pytest.raises(QdoraError, match="keep the adapters in fp32"):
        shard_model(model, torch.bfloat16, offload_params=False)


def test_process_group_backend(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert process_group_backend(torch.device("cuda", 0)) == "cuda:nccl,cpu:gloo"
    assert process_group_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setenv(BACKEND_ENV, "gloo")  # two ranks sharing one GPU
    assert process_group_backend(torch.device("cuda", 0)) == "gloo"
