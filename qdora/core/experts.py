"""A mixture-of-experts layer's experts in NF4, with optional per-expert DoRA/LoRA adapters.

transformers 5 computes a sparse block as router -> `experts(hidden, top_k_index, top_k_weights)`, the
experts holding fused 3-D weights (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]). `NF4Experts` is a
drop-in for that module: the router, its top-k and weights stay transformers' own (full precision,
frozen); each expert's weights are NF4, one `NF4Weight` per checkpoint tensor under the checkpoint's own
name (`experts.3.gate_proj`, Mixtral's `experts.3.w1`), so the streaming loader fills them one tensor at
a time and merge redoes the same round trip per tensor.

An adapted fused parameter gets an `ExpertsAdapter` child named like it (`experts.gate_up_proj`), laid out
as PEFT's `target_parameters` LoRA: per expert e, A_e [r, in] and B_e [out, r] (gate_up's B spans the gate
and the up rows), and for DoRA a magnitude m_e [out], with the layer's rule per expert row:

    y = (x·Ŵ_eᵀ + s·(x·A_eᵀ)·B_eᵀ) ⊙ (m_e / n_e),   n_e,i = ||Ŵ_e,i + s·B_e,i·A_e||₂ (detached)

n_e comes from the same factored expansion as `QDoRALinear` (no dense Ŵ + s·B·A). One autograd function
per fused parameter runs every routed expert: it dequantizes each expert once in forward and once in
backward, writes dA, dB, dm straight into their [E, ...] gradients, and saves only the packed bytes, the
routed inputs, x·Aᵀ and the pre-scale output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qdora.core.layer import (
    ADAPTER_ATTRS,
    _input_grads,
    _needs_grad,
    _scale_rows,
    adapter_scale,
    compute_dtype,
    dora_row_norm,
    merge_weight,
)
from qdora.core.moe_families import EXPERT_PARAMS, MoEFamily
from qdora.core.nf4 import NF4Spec, NF4Weight, dequantize_nf4
from qdora.core.shards import fill_param


class ExpertsAdapter(nn.Module):
    """The adapter of one fused expert parameter: lora_A [E, r, in], lora_B [E, out, r], magnitude [E, out]."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, alpha: float,
                 method: str = "dora", rslora: bool = False, adapter_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.r, self.alpha, self.method, self.rslora = r, alpha, method, rslora
        self.scale = adapter_scale(r, alpha, rslora)
        kw = dict(dtype=adapter_dtype, device=device)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, r, **kw))
        if method == "dora":
            self.magnitude = nn.Parameter(torch.empty(num_experts, out_features, **kw))
        else:
            self.register_parameter("magnitude", None)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by attribute name: lora_A, lora_B and (dora) magnitude."""
        return {name: p for name in ADAPTER_ATTRS if (p := getattr(self, name)) is not None}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter_tensors().values())

    def initial_adapter(self, seed: int) -> dict[str, torch.Tensor]:
        """PEFT's init per expert as whole fp32 CPU tensors (A uniform ±1/√in from a CPU generator seeded
        with `seed`, B zero, m = row norms of the dequantized Ŵ_e): the same on every rank."""
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.in_features)
        out = {"lora_A": torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=gen),
               "lora_B": torch.zeros(self.lora_B.shape)}
        if self.magnitude is not None:
            out["magnitude"] = self._row_norm_sq().detach().float().sqrt().cpu()
        return out

    def reset_adapter(self, seed: int = 0) -> None:
        """Put `initial_adapter(seed)` into the adapter (or this rank's shard of it)."""
        for name, full in self.initial_adapter(seed).items():
            fill_param(getattr(self, name), full)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
                f"method={self.method}, r={self.r}, alpha={self.alpha}, rslora={self.rslora}")


class ExpertWeights(nn.Module):
    """One expert's NF4 weights, as children named like its checkpoint tensors (gate_proj, w1, ...)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], double_quant: bool,
                 storage_dtype: torch.dtype | None, device):
        super().__init__()
        for name, (out, inn) in shapes.items():
            self.add_module(name, NF4Weight(NF4Spec(out, inn, double_quant), storage_dtype, device=device))


def _expert_weight(nf4: tuple[torch.Tensor, ...], e: int, specs: tuple[NF4Spec, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    """Expert e's dense [out, in] weight: its parts (gate, up) dequantized and stacked by rows."""
    n = len(specs)
    parts = [dequantize_nf4(*nf4[(e * n + p) * 6:(e * n + p + 1) * 6], specs[p], dtype) for p in range(n)]
    return parts[0] if n == 1 else torch.cat(parts, dim=0)


class _ExpertsLinearFunction(torch.autograd.Function):
    """y rows of expert e = x rows of expert e through expert e's (adapted) weight; rows sorted by expert."""

    @staticmethod
    def forward(ctx, x, a, b, m, row_norm_sq, counts: list[int], specs: tuple[NF4Spec, ...], scale: float,
                dtype: torch.dtype, *nf4):
        out_f = sum(s.out_features for s in specs)
        out_dtype = x.dtype
        xs = x.to(dtype)
        ys, xas, pres = [], [], []
        n_all = mn_all = None
        if m is not None:
            n_all = torch.ones(len(counts), out_f, dtype=torch.float32, device=x.device)
            mn_all = torch.ones_like(n_all)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            xe = xs[start:start + c]
            start += c
            w = _expert_weight(nf4, e, specs, dtype)
            y = xe @ w.t()
            if a is not None:
                ae, be = a[e].to(dtype), b[e].to(dtype)
                xa = xe @ ae.t()
                y.addmm_(xa, be.t(), alpha=scale)
                xas.append(xa)
                if m is not None:
                    n = dora_row_norm(w, ae, be, scale, row_norm_sq[e])
                    n_all[e] = n
                    mn_all[e] = m[e].float() / n
                    pres.append(y)
                    y = _scale_rows(y.to(out_dtype), mn_all[e])
            ys.append(y.to(out_dtype))
            del w
        y = torch.cat(ys) if ys else x.new_zeros(0, out_f)
        xa_all = torch.cat(xas) if xas else None
        pre_all = torch.cat(pres) if pres else None
        ctx.save_for_backward(xs, a, b, xa_all, pre_all, n_all, mn_all, *nf4)
        ctx.counts, ctx.specs, ctx.scale, ctx.dtype = counts, specs, scale, dtype
        ctx.dtypes = (x.dtype, None if a is None else a.dtype, None if b is None else b.dtype,
                      None if m is None else m.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, a, b, xa_all, pre_all, n_all, mn_all, *nf4 = ctx.saved_tensors
        s, dtype = ctx.scale, ctx.dtype
        x_dt, a_dt, b_dt, m_dt = ctx.dtypes
        need = _needs_grad(ctx, _ExpertsLinearFunction)
        dx = torch.zeros(xs.shape, dtype=x_dt, device=xs.device) if need["x"] else None
        da = torch.zeros(a.shape, dtype=torch.float32, device=a.device) if a is not None and need["a"] else None
        db = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if b is not None and need["b"] else None
        dm = torch.zeros(n_all.shape, dtype=torch.float32, device=n_all.device) \
            if n_all is not None and need["m"] else None
        start = 0
        for e, c in enumerate(ctx.counts):
            if c == 0:
                continue
            rows = slice(start, start + c)
            start += c
            dye = dy[rows]
            if n_all is not None:
                if dm is not None:
                    dm[e] = torch.sum(dye * pre_all[rows].to(dye.dtype), dim=0, dtype=torch.float32) / n_all[e]
                g = _scale_rows(dye, mn_all[e]).to(dtype)
            else:
                g = dye.to(dtype)
            d_xa = None
            if a is not None:
                ae, be = a[e].to(dtype), b[e].to(dtype)
                d_xa = (g @ be) * s
                if da is not None:
                    da[e] = d_xa.t().float() @ xs[rows].float()
                if db is not None:
                    db[e] = (g.t().float() @ xa_all[rows].float()) * s
            if dx is not None:
                w = _expert_weight(tuple(nf4), e, ctx.specs, dtype)
                dxe = g @ w
                del w
                if d_xa is not None:
                    dxe.addmm_(d_xa, ae)
                dx[rows] = dxe.to(x_dt)
        return _input_grads(ctx, _ExpertsLinearFunction, x=dx, a=None if da is None else da.to(a_dt),
                            b=None if db is None else db.to(b_dt), m=None if dm is None else dm.to(m_dt))


class NF4Experts(nn.Module):
    """transformers' fused experts module in NF4 (see the module docstring); same forward signature."""

    def __init__(self, family: MoEFamily, num_experts: int, hidden_dim: int, intermediate_dim: int,
                 act_fn: nn.Module, double_quant: bool = True, storage_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.family = family
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        shapes = {family.gate: (intermediate_dim, hidden_dim), family.up: (intermediate_dim, hidden_dim),
                  family.down: (hidden_dim, intermediate_dim)}
        for e in range(num_experts):
            self.add_module(str(e), ExpertWeights(shapes, double_quant, storage_dtype, device))
        self.act_fn = act_fn

    def expert(self, e: int) -> ExpertWeights:
        return getattr(self, str(e))

    def part_weights(self, e: int, param: str) -> list[NF4Weight]:
        """Expert e's NF4 weights making up the fused `param` (gate_up_proj: [gate, up]; down_proj: [down])."""
        ex = self.expert(e)
        return [getattr(ex, name) for name in self.family.parts[param]]

    def shape(self, param: str) -> tuple[int, int]:
        """(out, in) of one expert's slice of a fused parameter."""
        if param == "gate_up_proj":
            return 2 * self.intermediate_dim, self.hidden_dim
        return self.hidden_dim, self.intermediate_dim

    def adapter(self, param: str) -> ExpertsAdapter | None:
        child = self._modules.get(param)
        return child if isinstance(child, ExpertsAdapter) else None

    def add_adapter(self, param: str, r: int, alpha: float, method: str, rslora: bool,
                    adapter_dtype: torch.dtype, device) -> ExpertsAdapter:
        out, inn = self.shape(param)
        adapter = ExpertsAdapter(self.num_experts, inn, out, r, alpha, method, rslora, adapter_dtype, device)
        # the magnitude's init reads this module's row norms: a plain reference, not a registered child
        object.__setattr__(adapter, "_row_norm_sq", lambda: self.row_norm_sq(param))
        self.add_module(param, adapter)
        return adapter

    def row_norm_sq(self, param: str) -> torch.Tensor:
        """||Ŵ_e,i||² for every expert and row of a fused parameter: [E, out] fp32."""
        return torch.stack([torch.cat([w.row_norm_sq for w in self.part_weights(e, param)])
                            for e in range(self.num_experts)])

    @classmethod
    def from_experts(cls, module: nn.Module, family: MoEFamily, double_quant: bool = True,
                     storage_dtype: torch.dtype | None = None) -> NF4Experts:
        """Replace transformers' experts module: empty on meta (the loader fills it), else quantized."""
        gate_up, down = module.gate_up_proj, module.down_proj
        num, two_i, hidden = gate_up.shape
        inter = two_i // 2
        new = cls(family, num, hidden, inter, module.act_fn, double_quant, storage_dtype, device=gate_up.device)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for e in range(num):
                    ex = new.expert(e)
                    getattr(ex, family.gate).quantize_(gate_up[e, :inter].float())
                    getattr(ex, family.up).quantize_(gate_up[e, inter:].float())
                    getattr(ex, family.down).quantize_(down[e].float())
        return new

    def _linear(self, param: str, x: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        adapter = self.adapter(param)
        specs = tuple(w.spec for w in self.part_weights(0, param))
        nf4 = tuple(t for e in range(self.num_experts) for w in self.part_weights(e, param) for t in w.tensors())
        a = b = m = norms = None
        scale = 1.0
        if adapter is not None:
            a, b, m, scale = adapter.lora_A, adapter.lora_B, adapter.magnitude, adapter.scale
            if m is not None:
                norms = self.row_norm_sq(param)
        return _ExpertsLinearFunction.apply(x, a, b, m, norms, counts, specs, scale, dtype, *nf4)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · down_e(act(gate_e(x)) · up_e(x)) over each token's top-k experts e, as transformers'."""
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        counts_all = torch.bincount(flat, minlength=self.num_experts + 1)
        counts = counts_all[: self.num_experts].tolist()  # index == E marks a dropped slot (transformers skips it)
        order = torch.argsort(flat, stable=True)[: sum(counts)]
        token = order // k
        x = hidden_states[token]
        dtype = compute_dtype(hidden_states)
        with torch.autocast(hidden_states.device.type, enabled=False):
            h = self._linear("gate_up_proj", x, counts, dtype)
        gate, up = h.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        with torch.autocast(hidden_states.device.type, enabled=False):
            y = self._linear("down_proj", h, counts, dtype)
        y = y * top_k_weights.reshape(-1)[order, None]
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, token, y.to(out.dtype))

    @torch.no_grad()
    def merged_weight(self, e: int, param: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert e's dense slice of a fused parameter with its adapter folded in (fp32 math)."""
        w = torch.cat([p.dequantize(torch.float32) for p in self.part_weights(e, param)])
        adapter = self.adapter(param)
        if adapter is None:
            return w.to(dtype)
        m = None if adapter.magnitude is None else adapter.magnitude[e]
        return merge_weight(w, adapter.lora_A[e], adapter.lora_B[e], m, adapter.scale).to(dtype)

    def extra_repr(self) -> str:
        return (f"{self.family.model_type}: experts={self.num_experts}, hidden={self.hidden_dim}, "
                f"intermediate={self.intermediate_dim}, nf4")


def experts_modules(model: nn.Module) -> dict[str, NF4Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Experts)}


__all__ = ["EXPERT_PARAMS", "ExpertWeights", "ExpertsAdapter", "NF4Experts", "experts_modules"]
