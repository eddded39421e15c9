"""Distribution and memory policy: process group, FSDP2 wrapping, checkpointing, offload, gathering.

One process (no `torchrun`): no process group, no FSDP, autocast for bf16/fp16 compute.
Under `torchrun` (WORLD_SIZE > 1): a process group (`cuda:nccl,cpu:gloo` on CUDA: with `--offload params`
the shards and the gathered optimizer state live on the host, which NCCL cannot reach; gloo on CPU),
`fully_shard` per decoder block and at the root, optional `CPUOffloadPolicy`.

Byte safety (torch < 2.13, NF4 bytes viewed as bf16): FSDP2 copies a group's parameters into one all-gather
buffer with `torch._foreach_copy_`, which on CUDA goes through fp32 and rewrites every bf16 NaN pattern
(0.4% of 16-bit words) to one canonical NaN. When a group's all-gather inputs have *mixed* dtypes, FSDP2
gathers raw bytes (uint8) instead. So with bf16-viewed bytes there is no `MixedPrecisionPolicy` (it would
make every input bf16): parameters are gathered in their own dtypes (fp32 adapters beside bf16 bytes:
mixed, so raw bytes) and autocast does the compute casting; `check_byte_safe` refuses any group that
would still gather bf16-viewed bytes as bf16. With uint8 bytes (torch >= 2.13) the policy
`MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=fp32)` casts float parameters only.
Gradient checkpointing is transformers' own per-layer, non-reentrant one (module names stay unchanged,
so adapter keys stay PEFT's). Activation offload wraps the forward in `HiddenStateOffload`.
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

    @property
    def host_collectives(self) -> bool:
        """Whether collectives on CPU tensors work (gloo on CPU, or a `cuda:nccl,cpu:gloo` group): small
        host-side sums then need no device sync."""
        if not self.sharded or self.device.type == "cpu":
            return True
        return "gloo" in str(dist.get_backend())

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True if the flag is set on any rank (so every rank takes the same branch)."""
        if not self.sharded:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device="cpu" if self.host_collectives else self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())  # a host tensor over gloo: no wait for the GPU


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


BACKEND_ENV = "QDORA_DIST_BACKEND"  # e.g. gloo: 2 ranks sharing one GPU (NCCL refuses that)


def process_group_backend(device: torch.device) -> str:
    """nccl for CUDA tensors plus gloo for the CPU ones (offloaded shards, gathered state); gloo on CPU.

    QDORA_DIST_BACKEND overrides it (`gloo` lets two ranks share one GPU, which NCCL refuses)."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced:
        return forced
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


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
            dist.init_process_group(process_group_backend(device), rank=0, world_size=1)
        else:
            dist.init_process_group(process_group_backend(device))
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
    """Kept for callers: every compute dtype is byte-safe now (bf16-viewed bytes get no casting policy)."""


def fsdp_casts_params() -> bool:
    """Whether sharded runs use FSDP2's MixedPrecisionPolicy (uint8 bytes) or autocast (bf16-viewed bytes)."""
    return default_storage_dtype() == torch.uint8


def _all_gather_dtypes(model: nn.Module):
    """(module path, [(parameter, all-gather dtype)]) of every `fully_shard`ed module: the policy's
    param_dtype for floating parameters it casts, else the parameter's own (FSDP2 internals, torch 2.4+)."""
    for path, mod in model.named_modules():
        get_state = getattr(mod, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
        if group is None:
            continue
        cast = getattr(group.mp_policy, "param_dtype", None)
        out = []
        for fp in group.fsdp_params:
            p = fp.sharded_param
            out.append((p, cast if cast is not None and p.dtype.is_floating_point else p.dtype))
        yield path or "(root)", out


def check_byte_safe(model: nn.Module) -> None:
    """Refuse a sharded model whose bf16-viewed NF4 bytes FSDP2 would all-gather as bf16 (see the docstring).

    FSDP2 gathers a group in raw bytes exactly when its all-gather inputs (each parameter in its policy
    dtype, else its own) do not all share one dtype.
    """
    from qdora.core.nf4 import NF4Weight

    nf4 = {id(m.packed) for m in model.modules() if isinstance(m, NF4Weight) and m.packed.dtype == torch.bfloat16}
    nf4 |= {id(m.absmax) for m in model.modules() if isinstance(m, NF4Weight) and m.absmax.dtype == torch.bfloat16}
    if not nf4:
        return
    for path, params in _all_gather_dtypes(model):
        holds = any(id(p) in nf4 for p, _ in params)
        dtypes = {dt for _, dt in params}
        if holds and dtypes == {torch.bfloat16}:
            raise QdoraError(
                f"FSDP2 would all-gather {path}'s NF4 bytes (stored as bf16 views on torch {torch.__version__}) "
                "as bf16, which CUDA's copy kernels corrupt (NaN bit patterns): keep the adapters in fp32, "
                "or use torch >= 2.13 (uint8 storage)")


def shard_model(model: nn.Module, compute: torch.dtype, offload_params: bool, root_blocks: nn.Module | None = None
                ) -> None:
    """FSDP2: one `fully_shard` per decoder block (of `root_blocks`, default `model`), then `model` as the
    root (embeddings, final norm, lm_head). The casting policy is byte-safe (module docstring)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw = {}
    if compute != torch.float32 and fsdp_casts_params():
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    kw["offload_policy"] = CPUOffloadPolicy() if offload_params else OffloadPolicy()
    for block in decoder_blocks(root_blocks if root_blocks is not None else model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    check_byte_safe(model)


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
    """Context for the forward: saved hidden states go to pinned host memory on a side stream and are
    prefetched back during the backward (qdora/train/offload.py); parameters never move; no-op on CPU."""
    if not enabled:
        return contextlib.nullcontext()
    from qdora.train.offload import HiddenStateOffload

    return HiddenStateOffload(device)


def autocast(device: torch.device, compute: torch.dtype, sharded: bool):
    """Autocast to the compute dtype, unless FSDP2's policy does the casting (sharded, uint8 bytes)."""
    if compute == torch.float32 or (sharded and fsdp_casts_params()):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state on the CPU keyed by parameter names (torch's distributed state-dict API:
    gathered under FSDP2, the same layout for any number of ranks; a collective, but only rank 0 gets the
    state under FSDP2, the others an empty one)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from qdora.train.optim import bnb_state_dict, is_bnb

    if is_bnb(optimizer):  # bitsandbytes 8-bit AdamW (unsharded runs only)
        return bnb_state_dict(model, optimizer)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state`: every rank passes the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from qdora.train.optim import is_bnb, load_bnb_state_dict

    if is_bnb(optimizer):
        load_bnb_state_dict(model, optimizer, state)
        return
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in state["state"]]
    if missing:
        raise QdoraError(f"the checkpoint's optimizer state lacks {missing[:2]}: it is from another model/config")
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
