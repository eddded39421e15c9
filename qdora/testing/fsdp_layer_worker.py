"""Worker for the 2-rank FSDP2 test: each gloo rank shards the same adapted tiny model and takes one step.

Run by `torch.multiprocessing.spawn` from tests/test_fsdp_layer.py (and importable, so it is not a test).
Writes the gathered packed bytes, the loss and the updated adapter of every rank to `out_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def build(model_dir: str, mp_bf16: bool):
    from transformers import AutoModelForCausalLM

    from qdora.core.adapt import AdapterSpec, adapt_model, adapter_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapt_model(model, AdapterSpec(r=4, alpha=8, adapter_dtype="float32"))
    with torch.no_grad():  # non-zero B so the DoRA norm and magnitude matter
        g = torch.Generator().manual_seed(1)
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def batch(model_dir: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 300, (4, 16), generator=g)


def step(model, ids: torch.Tensor, n_tokens_global: int, world: int = 1):
    """Forward + backward of a token-weighted loss (sum over this rank's tokens / global token count).

    FSDP2 averages gradients over ranks (divides by `world`), so the loss is multiplied by `world`
    (gloo cannot apply a custom divide factor: no PREMUL_SUM).
    Gradients are compared rather than post-AdamW weights: Adam's first update g/(|g|+eps) turns float
    noise in near-zero gradients into O(lr) differences.
    """
    logits = model(ids).logits[:, :-1].float()
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    (loss_sum * world / n_tokens_global).backward()
    return loss_sum.detach()


def worker(rank: int, world: int, model_dir: str, out_dir: str, port: int, mp_bf16: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from qdora.core.adapt import adapter_layers, decoder_blocks

    model = build(model_dir, mp_bf16)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp_bf16 else None
    kw = {"mp_policy": mp} if mp else {}
    for block in decoder_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)

    layers = adapter_layers(model)
    packed = {p: layer.base.packed for p, layer in layers.items()}
    assert all(isinstance(t, DTensor) for t in packed.values()), "packed bytes were not sharded"
    local_rows = {p: t.to_local().shape[0] for p, t in packed.items()}
    gathered = {p: t.full_tensor() for p, t in packed.items()}

    ids = batch(model_dir)
    per_rank = ids.shape[0] // world
    mine = ids[rank * per_rank:(rank + 1) * per_rank]
    n_tokens = ids[:, 1:].numel()
    if mp_bf16:
        with torch.no_grad():
            logits = model(mine).logits
        torch.save({"logits": logits.float()}, Path(out_dir) / f"mp-rank{rank}.pt")
        dist.destroy_process_group()
        return
    loss_sum = step(model, mine, n_tokens, world)
    dist.all_reduce(loss_sum)
    grads = {f"{p}.{n}": t.grad.full_tensor() for p, layer in layers.items()
             for n, t in layer.adapter_tensors().items()}
    torch.save({"packed": gathered, "local_rows": local_rows, "loss": loss_sum / n_tokens,
                "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
