"""NF4 storage that FSDP2 can shard: bitsandbytes' bits, held as plain tensors.

bitsandbytes keeps a 4-bit weight in a `Params4bit` tensor subclass that carries its `QuantState` as
Python attributes; FSDP2 shards and all-gathers plain tensors and loses such attributes. So we quantize
with bitsandbytes, keep the packed bytes and per-block statistics as ordinary tensors laid out by row
(`[out, in/2]` bytes, `[out, in/blocksize]` absmax), and rebuild the `QuantState` at dequantize time.
Row layout means a dim-0 shard holds whole rows, and a rank can fill its shard from a row slice.

Storage dtype: packed bytes and (double-quantized) absmax are uint8 where torch's FSDP2 accepts frozen
uint8 parameters (torch >= 2.13), else viewed as bfloat16 (docs/design.md, "NF4 storage that FSDP2 can
shard"). Integer bytes are never touched by a float code path; a mixed-precision policy never casts them.
Without double quantization the fp32 absmax is stored as its raw bytes (uint8 view), for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qdora.errors import QdoraError

BLOCKSIZE = 64  # weights per NF4 block (one absmax each), as QLoRA and bitsandbytes' default
NESTED_BLOCKSIZE = 256  # absmax values per second-level block under double quantization


STORAGE_ENV = "QDORA_NF4_STORAGE"  # uint8 | bfloat16: force a layout (tests run torch < 2.13's on newer torch)


def torch_accepts_uint8_params() -> bool:
    """FSDP2 shards frozen uint8 parameters from torch 2.13 on (older: "only Tensors of floating point...")."""
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 13)


def default_storage_dtype() -> torch.dtype:
    """uint8 where FSDP2 accepts frozen integer parameters (torch >= 2.13), else bytes viewed as bf16.

    The environment variable QDORA_NF4_STORAGE=bfloat16|uint8 overrides it (uint8 only where torch allows).
    """
    import os

    forced = os.environ.get(STORAGE_ENV, "")
    if forced:
        if forced not in ("uint8", "bfloat16"):
            raise QdoraError(f"{STORAGE_ENV}={forced!r}: use uint8 or bfloat16")
        if forced == "uint8" and not torch_accepts_uint8_params():
            raise QdoraError(f"{STORAGE_ENV}=uint8 needs torch >= 2.13 (this is {torch.__version__})")
        return getattr(torch, forced)
    return torch.uint8 if torch_accepts_uint8_params() else torch.bfloat16


def _as_storage(t: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Reinterpret raw bytes (last dim even for bf16) as the storage dtype, without touching the bits."""
    t = t.contiguous().view(torch.uint8)
    return t if storage == torch.uint8 else t.view(storage)


@dataclass(frozen=True)
class NF4Spec:
    """Shape and options of one quantized weight; everything needed to rebuild the QuantState."""

    out_features: int
    in_features: int
    double_quant: bool = True
    blocksize: int = BLOCKSIZE

    @property
    def blocks_per_row(self) -> int:
        return self.in_features // self.blocksize


def check_quantizable(out_features: int, in_features: int, blocksize: int = BLOCKSIZE) -> None:
    """NF4 blocks must not cross rows, or row shards would split a block: refuse clearly."""
    if in_features % blocksize:
        raise QdoraError(
            f"cannot quantize a {out_features}x{in_features} weight: its input size {in_features} is not "
            f"a multiple of the NF4 block size {blocksize}"
        )


class NF4Weight(nn.Module):
    """A frozen NF4 weight: packed bytes and absmax as frozen parameters, small statistics as buffers.

    `packed` and `absmax` are registered as parameters (requires_grad=False) so FSDP2 shards them;
    the second-level statistics (`absmax2`, `code2`, `offset`, one value per 256 blocks or fewer) and
    the 16-entry NF4 `code` are replicated buffers. `row_norm_sq` holds ||Ŵ_i||² of the dequantized
    weight in fp32: the constant term of the DoRA norm.
    """

    def __init__(self, spec: NF4Spec, storage_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        check_quantizable(spec.out_features, spec.in_features, spec.blocksize)
        self.spec = spec
        self.storage_dtype = storage_dtype or default_storage_dtype()
        out, bpr = spec.out_features, spec.blocks_per_row
        absmax_bytes = bpr if spec.double_quant else 4 * bpr
        div = 2 if self.storage_dtype == torch.bfloat16 else 1
        if self.storage_dtype == torch.bfloat16 and absmax_bytes % 2:
            raise QdoraError("bf16-viewed NF4 storage needs an even number of absmax bytes per row")
        kw = dict(device=device)
        self.packed = nn.Parameter(
            torch.empty(out, spec.in_features // 2 // div, dtype=self.storage_dtype, **kw), requires_grad=False
        )
        self.absmax = nn.Parameter(
            torch.empty(out, absmax_bytes // div, dtype=self.storage_dtype, **kw), requires_grad=False
        )
        n_blocks = out * bpr
        n2 = -(-n_blocks // NESTED_BLOCKSIZE) if spec.double_quant else 1
        self.register_buffer("absmax2", torch.zeros(n2, dtype=torch.float32, **kw))
        self.register_buffer("code2", torch.zeros(256 if spec.double_quant else 1, dtype=torch.float32, **kw))
        self.register_buffer("offset", torch.zeros(1, dtype=torch.float32, **kw))
        self.register_buffer("code", torch.zeros(16, dtype=torch.float32, **kw))
        self.register_buffer("row_norm_sq", torch.zeros(out, dtype=torch.float32, **kw))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.spec.out_features, self.spec.in_features)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> NF4Weight:
        """Quantize a full-precision [out, in] weight into this module's storage (any device)."""
        if tuple(weight.shape) != self.shape:
            raise QdoraError(f"weight of shape {tuple(weight.shape)} does not match NF4 storage {self.shape}")
        packed, absmax, absmax2, code2, offset, code = quantize_nf4(weight, self.spec)
        self.packed.data = _as_storage(packed, self.storage_dtype).to(self.packed.device)
        self.absmax.data = _as_storage(absmax, self.storage_dtype).to(self.absmax.device)
        dev = self.absmax2.device
        self.absmax2 = absmax2.to(dev)
        self.code2 = code2.to(dev)
        self.offset = offset.to(dev)
        self.code = code.to(dev)
        self.row_norm_sq = self.dequantize(torch.float32).pow(2).sum(dim=1)
        return self

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors `dequantize_nf4` takes, in its order (an autograd function's frozen inputs)."""
        return self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.code

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The full [out, in] weight, via bitsandbytes' kernel on the storage's device."""
        return dequantize_nf4(*self.tensors(), self.spec, dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s.out_features}x{s.in_features}, nf4, double_quant={s.double_quant}, storage={self.storage_dtype}"


def quantize_nf4(weight: torch.Tensor, spec: NF4Spec) -> tuple[torch.Tensor, ...]:
    """bitsandbytes NF4 quantization, returned as row-laid-out byte tensors and fp32 statistics.

    Returns (packed uint8 [out, in/2], absmax uint8 [out, absmax bytes per row], absmax2 fp32,
    code2 fp32, offset fp32 [1], code fp32 [16]). Bytes are exactly those of `Params4bit`.
    """
    import bitsandbytes.functional as bnbf  # here, not at import: `qdora plan` needs only the constants

    out, inn = spec.out_features, spec.in_features
    packed, qs = bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
    )
    packed = packed.reshape(out, inn // 2)
    if spec.double_quant:
        absmax = qs.absmax.reshape(out, spec.blocks_per_row)
        absmax2 = qs.state2.absmax.float()
        code2 = qs.state2.code.float()
        offset = qs.offset.float().reshape(1)
    else:
        absmax = qs.absmax.float().contiguous().view(torch.uint8).reshape(out, 4 * spec.blocks_per_row)
        absmax2 = torch.zeros(1)
        code2 = torch.zeros(1)
        offset = torch.zeros(1)
    return packed, absmax, absmax2, code2, offset, qs.code.float()


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    offset: torch.Tensor,
    code: torch.Tensor,
    spec: NF4Spec,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Rebuild bitsandbytes' QuantState from plain tensors and dequantize to [out, in]."""
    import bitsandbytes.functional as bnbf

    absmax_u8 = absmax.contiguous().view(torch.uint8).reshape(-1)
    if spec.double_quant:
        state2 = bnbf.QuantState(absmax=absmax2, code=code2, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        qs = bnbf.QuantState(
            absmax=absmax_u8,
            shape=torch.Size((spec.out_features, spec.in_features)),
            code=code,
            blocksize=spec.blocksize,
            quant_type="nf4",
            dtype=dtype,
            offset=offset.reshape(()),
            state2=state2,
        )
    else:
        qs = bnbf.QuantState(
            absmax=absmax_u8.view(torch.float32),
            shape=torch.Size((spec.out_features, spec.in_features)),
            code=code,
            blocksize=spec.blocksize,
            quant_type="nf4",
            dtype=dtype,
        )
    return bnbf.dequantize_4bit(packed.contiguous().view(torch.uint8).reshape(-1, 1), qs)


def nf4_from_weight(
    weight: torch.Tensor,
    double_quant: bool = True,
    storage_dtype: torch.dtype | None = None,
) -> NF4Weight:
    """Convenience: a new NF4Weight holding `weight` quantized (on the weight's device)."""
    out, inn = weight.shape
    nf4 = NF4Weight(NF4Spec(out, inn, double_quant), storage_dtype, device=weight.device)
    return nf4.quantize_(weight)
