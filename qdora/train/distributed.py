"""Distribution and memory policy: process group, FSDP2 wrapping, checkpointing, offload, gathering.

One process (no `torchrun`): no process group, no FSDP, autocast for bf16/fp16 compute.
Under `torchrun` (WORLD_SIZE > 1): a process group (nccl on CUDA, gloo on CPU), `fully_shard` per decoder
block and at the root with `MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=fp32)`, optional
`CPUOffloadPolicy`. uint8 NF4 bytes are never cast by the policy (it casts floating parameters only);
with torch < 2.13 the bytes are bf16 views, so only bf16 (or fp32: no casting) compute is allowed.
Gradient checkpointing is transformers' own per-layer, non-reentrant one (module names stay unchanged,
so adapter keys stay PEFT's). Activation offload wraps the forward in `save_on_cpu`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qdora.core.adapt import decoder_blocks
from qdora.core.nf4 import default_storage_dtype
from qdora.errors import QdoraError


@dataclass
class Dist:
    """Where this process sits: rank, world size, device; `sharded` when FSDP2 is in use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # FSDP2 in use (several ranks, or one rank offloading parameters to the CPU)
    owns_group: bool = False  # this run started the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True if the flag is set on any rank (so every rank takes the same branch)."""
        if not self.sharded:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def pick_device(requested: str, local_rank: int) -> torch.device:
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QdoraError("--device cuda was requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup_distributed(requested_device: str, offload_params: bool = False) -> Dist:
    """Read torchrun's environment and start the process group when there are several ranks.

    One process with `--offload params|all` also runs under FSDP2 (a 1-rank group) so that
    `CPUOffloadPolicy` can stream the frozen base from host memory layer by layer.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if offload_params and device.type != "cuda":
        raise QdoraError("--offload params/all moves GPU parameters to host memory: it needs a CUDA device "
                         "(on CPU everything is in host memory already)")
    owns = False
    if (world > 1 or offload_params) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
        else:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, local_rank, device, sharded=world > 1 or offload_params, owns_group=owns)


def free_port() -> int:
    """A TCP port free on this host right now (for a one-process group, and the tests' torchrun)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown_distributed(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def check_mixed_precision(compute: torch.dtype, sharded: bool) -> None:
    """bf16-viewed NF4 bytes (torch < 2.13) must not be cast to fp16 by the FSDP2 policy: refuse clearly."""
    if sharded and compute == torch.float16 and default_storage_dtype() == torch.bfloat16:
        raise QdoraError(
            f"--dtype fp16 with several ranks needs torch >= 2.13 (this is {torch.__version__}): NF4 bytes are "
            "stored as bf16 views on older torch and an fp16 FSDP2 policy would corrupt them; use --dtype bf16"
        )


def shard_model(model: nn.Module, compute: torch.dtype, offload_params: bool, root_blocks: nn.Module | None = None
                ) -> None:
    """FSDP2: one `fully_shard` per decoder block (of `root_blocks`, default `model`), then `model` as the
    root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw = {}
    if compute != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    kw["offload_policy"] = CPUOffloadPolicy() if offload_params else OffloadPolicy()
    for block in decoder_blocks(root_blocks if root_blocks is not None else model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Per-decoder-layer, non-reentrant recomputation (transformers' GradientCheckpointingLayer)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise QdoraError(f"{type(model).__name__} does not support gradient checkpointing; "
                         "use --no-gradient-checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def activation_offload(enabled: bool, device: torch.device):
    """Context for the forward: saved activations go to (pinned) host memory and come back in backward."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def autocast(device: torch.device, compute: torch.dtype, sharded: bool):
    """Single process: autocast to the compute dtype (FSDP2's policy does the casting when sharded)."""
    if sharded or compute == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state on the CPU keyed by parameter names (torch's distributed state-dict API:
    gathered under FSDP2, the same layout for any number of ranks; a collective, but only rank 0 gets the
    state under FSDP2, the others an empty one)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state`: every rank passes the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in state["state"]]
    if missing:
        raise QdoraError(f"the checkpoint's optimizer state lacks {missing[:2]}: it is from another model/config")
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
