"""The QDoRA / QLoRA linear layer: a frozen NF4 base plus a low-rank adapter, one autograd function.

    y = (x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ) ⊙ (m / n) + bias,   n_i = ||Ŵ_i + s·B_i·A||₂ (detached)

PEFT builds the dense `Ŵ + s·B·A` every step to take its row norms, and dequantizes twice. Here the
norm comes from the expansion (docs/design.md, "The DoRA norm")

    n_i² = ||Ŵ_i||² + 2s·⟨(Ŵ·Aᵀ)_i, B_i⟩ + s²·B_i·(A·Aᵀ)·B_iᵀ

with ||Ŵ_i||² precomputed at quantization time, so no out×in temporary exists beyond the dequantized
weight the matmul needs anyway. The custom autograd function dequantizes once in forward and once in
backward (and not at all when no input gradient is needed), and saves only the packed bytes, x, x·Aᵀ
and the pre-scale output. In `lora` mode the same layer is plain QLoRA (m/n ≡ 1, no magnitude).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Literal

import torch
from torch import nn

from qdora.core.nf4 import NF4Spec, NF4Weight, dequantize_nf4
from qdora.core.shards import fill_param
from qdora.options import METHOD

Method = Literal["dora", "lora"]

# The adapter's parameter names on QDoRALinear, in this order everywhere (PEFT's key suffixes for them are
# derived in `qdora.core.adapter_io`); no other module spells them.
ADAPTER_ATTRS = ("lora_A", "lora_B", "magnitude")
A, B, M = ADAPTER_ATTRS


def adapter_shapes(in_features: int, out_features: int, r: int, method: Method) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor of one layer: A [r, in], B [out, r], magnitude [out] (dora only)."""
    shapes = {A: (r, in_features), B: (out_features, r)}
    if method == "dora":
        shapes[M] = (out_features,)
    return shapes


def adapter_scale(r: int, alpha: float, rslora: bool) -> float:
    """LoRA scaling: alpha/r, or alpha/sqrt(r) with rsLoRA (as PEFT's `use_rslora`)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def dora_row_norm(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, w_row_norm_sq: torch.Tensor
) -> torch.Tensor:
    """||w_i + s·b_i·a||₂ for every row i without forming w + s·b·a; fp32 accumulation.

    `w` is [out, in] (any float dtype; its product with aᵀ accumulates in fp32 on GPU), `a` [r, in],
    `b` [out, r], `w_row_norm_sq` the precomputed fp32 ||w_i||².
    """
    wa = (w @ a.to(w.dtype).t()).float()  # [out, r]: the base layer applied to the r rows of a
    af, bf = a.float(), b.float()
    aat = af @ af.t()  # [r, r]
    n2 = w_row_norm_sq + (2.0 * scale) * (wa * bf).sum(dim=1) + (scale * scale) * ((bf @ aat) * bf).sum(dim=1)
    return n2.clamp_min(1e-24).sqrt()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's own dtype."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _scale_rows(y: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """y ⊙ (m/n) per output feature, as y + y·(m/n − 1) so a low-precision y keeps small changes' rounding
    (the form PEFT uses); `mn` is fp32."""
    return torch.addcmul(y, y, (mn - 1.0).to(y.dtype))


@functools.cache
def _input_names(function: type[torch.autograd.Function]) -> tuple[str, ...]:
    """Names of `forward`'s named inputs, after ctx (a trailing *args holds frozen tensors: no gradients)."""
    params = list(inspect.signature(function.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD)


def _needs_grad(ctx, function: type[torch.autograd.Function]) -> dict[str, bool]:
    """ctx.needs_input_grad by input name."""
    return dict(zip(_input_names(function), ctx.needs_input_grad, strict=False))  # *nf4 unnamed


def _input_grads(ctx, function: type[torch.autograd.Function], **grads: torch.Tensor | None) -> tuple:
    """What `backward` returns: each input's gradient under the name `forward` gives that input, None for
    every other input, so adding or reordering an input cannot shift a gradient onto the wrong one."""
    names = _input_names(function)
    unknown = set(grads) - set(names)
    if unknown:
        raise TypeError(f"{function.__name__}.forward has no input {sorted(unknown)}")
    return tuple(grads.get(name) for name in names) + (None,) * (len(ctx.needs_input_grad) - len(names))


class _QDoRAFunction(torch.autograd.Function):
    """Forward and backward of the adapted layer in one function (weights frozen: no dW).

    Inputs: x (the base path's input), x_ad (the adapter's: x after dropout, or x itself), the adapter
    A, B, magnitude (None for lora), the frozen bias, the base's row norms and NF4 tensors
    (`NF4Weight.tensors()`), and constants.
    """

    @staticmethod
    def forward(ctx, x, x_ad, a, b, m, bias, row_norm_sq, spec: NF4Spec, scale: float, dtype: torch.dtype,
                *nf4: torch.Tensor):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        xa2 = x2 if x_ad is x else x_ad.reshape(-1, x_ad.shape[-1]).to(dtype)
        ac, bc = a.to(dtype), b.to(dtype)
        w = dequantize_nf4(*nf4, spec, dtype)
        y = x2 @ w.t()
        xa = xa2 @ ac.t()  # [T, r]
        y.addmm_(xa, bc.t(), alpha=scale)
        # The output has x's dtype (as bitsandbytes' Linear4bit): with an fp32 residual stream under bf16
        # autocast, the magnitude scale is applied in fp32. In bf16, m/n rounds to exactly 1.0 until m moves
        # by ~0.4%, and y·(m/n) would hide every early magnitude update.
        out_dtype = x.dtype
        mn = n = y_pre = None
        if m is not None:
            n = dora_row_norm(w, ac, bc, scale, row_norm_sq)
            mn = m.float() / n  # fp32 [out]
            y_pre = y
            y = _scale_rows(y_pre.to(out_dtype), mn)
        else:
            y = y.to(out_dtype)
        del w
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(x2, None if x_ad is x else xa2, xa, ac, bc, y_pre, mn, n, *nf4)
        ctx.shared_input = x_ad is x
        ctx.spec, ctx.scale, ctx.dtype = spec, scale, dtype
        ctx.in_dtypes = (x.dtype, x_ad.dtype, a.dtype, b.dtype, None if m is None else m.dtype)
        ctx.has_bias = bias is not None
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa2, xa, ac, bc, y_pre, mn, n, *nf4 = ctx.saved_tensors
        if xa2 is None:
            xa2 = x2
        s, dtype = ctx.scale, ctx.dtype
        x_dt, xad_dt, a_dt, b_dt, m_dt = ctx.in_dtypes
        need = _needs_grad(ctx, _QDoRAFunction)
        need_x, need_xad, need_a, need_b, need_m, need_bias = (need[k] for k in ("x", "x_ad", "a", "b", "m", "bias"))
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, dy.shape[-1])  # the output's dtype (x's)

        dm = None
        if mn is not None:
            if need_m:  # dm_i = Σ_t dy_ti · y_pre_ti / n_i   (n is detached: no other term)
                dm = (torch.sum(dy2 * y_pre.to(dy2.dtype), dim=0, dtype=torch.float32) / n).to(m_dt)
            g = _scale_rows(dy2, mn).to(dtype)
        else:
            g = dy2.to(dtype)
        d_xa = (g @ bc) * s  # [T, r]
        da = (d_xa.t() @ xa2).to(a_dt) if need_a else None
        db = ((g.t() @ xa) * s).to(b_dt) if need_b else None

        dx = dxad = None
        if need_x or (need_xad and ctx.shared_input):
            w = dequantize_nf4(*nf4, ctx.spec, dtype)
            dx = g @ w
            del w
            if ctx.shared_input:
                dx.addmm_(d_xa, ac)
            dx = dx.to(x_dt).reshape(*lead, dx.shape[-1])
        if need_xad and not ctx.shared_input:
            dxad = (d_xa @ ac).to(xad_dt).reshape(*lead, ac.shape[-1])
        dbias = dy2.sum(0, dtype=torch.float32) if ctx.has_bias and need_bias else None
        return _input_grads(ctx, _QDoRAFunction, x=dx, x_ad=dxad, a=da, b=db, m=dm, bias=dbias)


def _take_linear(layer: nn.Module, linear: nn.Linear) -> bool:
    """Quantize `linear`'s weight into `layer.base` and copy its bias; False (nothing to take) on meta."""
    if linear.weight.device.type == "meta":
        return False
    layer.base.quantize_(linear.weight.data)
    if linear.bias is not None:
        layer.bias.data = linear.bias.data.detach().clone()
    return True


class _FrozenNF4Function(torch.autograd.Function):
    """y = x·Ŵᵀ + b for a frozen NF4 weight: saves the packed bytes, re-dequantizes for dx."""

    @staticmethod
    def forward(ctx, x, bias, spec: NF4Spec, dtype: torch.dtype, *nf4: torch.Tensor):
        w = dequantize_nf4(*nf4, spec, dtype)
        y = (x.to(dtype) @ w.t()).to(x.dtype)  # x's dtype out, as the adapted layer and bnb's Linear4bit
        if bias is not None:
            y = y + bias.to(x.dtype)
        ctx.save_for_backward(*nf4)
        ctx.spec, ctx.dtype, ctx.x_dtype = spec, dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        if not _needs_grad(ctx, _FrozenNF4Function)["x"]:
            return _input_grads(ctx, _FrozenNF4Function)
        w = dequantize_nf4(*ctx.saved_tensors, ctx.spec, ctx.dtype)
        return _input_grads(ctx, _FrozenNF4Function, x=(dy.to(ctx.dtype) @ w).to(ctx.x_dtype))


class NF4Linear(nn.Module):
    """A frozen NF4 linear layer with no adapter: the untargeted linears of a QLoRA/QDoRA model."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, double_quant: bool = True,
                 storage_dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.base = NF4Weight(NF4Spec(out_features, in_features, double_quant), storage_dtype, device=device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True,
                    storage_dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantize an existing nn.Linear (its device); a meta linear gives an empty meta layer."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, double_quant,
                    storage_dtype, device=linear.weight.device)
        _take_linear(layer, linear)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return _FrozenNF4Function.apply(x, self.bias, b.spec, dtype, *b.tensors())

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight (there is no adapter to merge)."""
        return self.base.dequantize(torch.float32).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, frozen nf4"


class QDoRALinear(nn.Module):
    """A frozen NF4 linear layer with a trainable DoRA (default) or LoRA adapter.

    Parameters: `base` (NF4Weight, frozen), `lora_A` [r, in] (Kaiming-uniform init, as PEFT),
    `lora_B` [out, r] (zeros: the adapted layer equals the base layer at init), `magnitude` [out]
    (dora only; initialised to the dequantized row norms), `bias` (frozen passthrough, optional).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 16,
        alpha: float = 16.0,
        method: Method = "dora",
        rslora: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
        double_quant: bool = True,
        adapter_dtype: torch.dtype = torch.bfloat16,
        storage_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        METHOD.check(method)
        if r < 1:
            raise ValueError(f"rank must be >= 1, not {r}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.method, self.rslora = r, alpha, method, rslora
        self.scale = adapter_scale(r, alpha, rslora)
        self.base = NF4Weight(NF4Spec(out_features, in_features, double_quant), storage_dtype, device=device)
        shapes = adapter_shapes(in_features, out_features, r, method)
        for name in ADAPTER_ATTRS:
            if name in shapes:
                self.register_parameter(name, nn.Parameter(torch.empty(shapes[name], dtype=adapter_dtype,
                                                                       device=device)))
            else:
                self.register_parameter(name, None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_linear(cls, linear: nn.Linear, seed: int = 0, **kwargs) -> QDoRALinear:
        """Quantize an existing nn.Linear (its device) and attach the adapter `initial_adapter(seed)`.

        A meta linear gives an empty meta layer: the streaming loader fills the base and inits the adapter."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, **kwargs)
        if _take_linear(layer, linear):
            layer.reset_adapter(seed)
        return layer

    @torch.no_grad()
    def initial_adapter(self, seed: int) -> dict[str, torch.Tensor]:
        """PEFT's init as whole fp32 CPU tensors: A Kaiming-uniform(a=√5) from a CPU generator seeded with
        `seed`, B zero, magnitude = ||Ŵ_i|| of the dequantized base.

        The one adapter init: every rank computes it whole from the same seed (A is r×in, tiny), so a sharded
        model, a streamed one and an in-memory adapted one all start from the same adapter.
        """
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on [r, in] gives this bound
        shapes = adapter_shapes(self.in_features, self.out_features, self.r, self.method)
        out = {A: torch.empty(shapes[A], dtype=torch.float32).uniform_(-bound, bound, generator=gen),
               B: torch.zeros(shapes[B], dtype=torch.float32)}
        if M in shapes:
            out[M] = self.base.row_norm_sq.detach().float().sqrt().cpu()
        return out

    def reset_adapter(self, seed: int = 0) -> None:
        """Put `initial_adapter(seed)` into the adapter (or this rank's shard of it)."""
        for name, full in self.initial_adapter(seed).items():
            fill_param(getattr(self, name), full)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by attribute name: lora_A, lora_B and (dora) magnitude."""
        return {name: p for name in ADAPTER_ATTRS if (p := getattr(self, name)) is not None}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors: lora_A, lora_B and (dora) magnitude."""
        return list(self.adapter_tensors().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_ad = self.dropout(x)
        b = self.base
        dtype = compute_dtype(x)  # read before autocast is switched off below
        with torch.autocast(x.device.type, enabled=False):
            return _QDoRAFunction.apply(x, x_ad, self.lora_A, self.lora_B, self.magnitude, self.bias,
                                        b.row_norm_sq, b.spec, self.scale, dtype, *b.tensors())

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight this layer applies: m/n ⊙ (Ŵ + s·B·A) (dora) or Ŵ + s·B·A (lora)."""
        w = self.base.dequantize(torch.float32)
        return merge_weight(w, self.lora_A, self.lora_B, self.magnitude, self.scale).to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, method={self.method}, r={self.r}, "
                f"alpha={self.alpha}, rslora={self.rslora}")


@torch.no_grad()
def merge_weight(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Dense merge in fp32: m ⊙ (W + s·B·A) / ||W + s·B·A||_row, or W + s·B·A without magnitude."""
    merged = w.float() + scale * (b.float() @ a.float())
    if magnitude is None:
        return merged
    return merged * (magnitude.float() / merged.norm(dim=1)).unsqueeze(1)
