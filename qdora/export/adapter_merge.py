"""What a merge (or an analysis) needs to know before touching a weight: the base checkpoint, which of
its tensors are decoder-block linears, which of those carry the adapter, and the adapter's tensors.

Everything is checked up front (adapter fits the base: names and shapes), so a merge fails before it
writes anything. The model structure comes from a meta-device model (no weights are allocated).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qdora.core.adapt import AdapterSpec, experts_in_blocks, find_targets, linear_names_in_blocks
from qdora.core.adapter_io import load_adapter_tensors, read_adapter_config
from qdora.core.layer import ADAPTER_ATTRS, adapter_scale, adapter_shapes, merge_weight
from qdora.core.load import meta_model
from qdora.core.moe_families import moe_family_of
from qdora.core.nf4 import nf4_from_weight
from qdora.core.prequantized import bnb_format, companion_of, logical_shape, quantized_weights, read_parts
from qdora.errors import QdoraError
from qdora.io.weights import WeightReader, is_model_dir


def block_linear_keys(model_dir: Path) -> list[str]:
    """Checkpoint keys (`<path>.weight`) of every linear inside the decoder blocks."""
    return [p + ".weight" for p in linear_names_in_blocks(meta_model(model_dir))]


def expert_keys(model: torch.nn.Module) -> dict[str, tuple[str, int, slice]]:
    """Per-expert checkpoint keys of an MoE (meta) model -> (fused adapter path, expert, its rows in it).

    `model.layers.0.mlp.experts.3.up_proj.weight` -> (`model.layers.0.mlp.experts.gate_up_proj`, 3,
    rows I..2I); Mixtral's keys keep their checkpoint spelling (`block_sparse_moe.experts.3.w3.weight`)."""
    family = moe_family_of(model)
    out: dict[str, tuple[str, int, slice]] = {}
    for path, module in experts_in_blocks(model).items():
        num, two_i, _ = module.gate_up_proj.shape
        inter = two_i // 2
        for e in range(num):
            for param, names in family.parts.items():
                for i, name in enumerate(names):
                    rows = slice(i * inter, (i + 1) * inter) if len(names) > 1 else slice(None)
                    out[family.to_checkpoint(f"{path}.{e}.{name}.weight")] = (f"{path}.{param}", e, rows)
    return out


def resolve_base_dir(base_model: str | Path | None, adapter_cfg: dict, what: str = "adapter",
                     revision: str | None = None) -> Path:
    """--base-model (at --revision), else the adapter config's base_model_name_or_path at its recorded
    `revision`: a local model folder, or a Hub repository id fetched through the Hub cache."""
    from qdora.io.hub import names_org_repo, resolve_model

    candidate = base_model if base_model is not None else adapter_cfg.get("base_model_name_or_path")
    if not candidate:
        raise QdoraError(f"the {what} config names no base model: pass --base-model DIR")
    src = "--base-model" if base_model is not None else f"the {what} config's base_model_name_or_path"
    if revision is None and base_model is None:
        revision = adapter_cfg.get("revision")
    if not Path(candidate).exists() and names_org_repo(str(candidate)):
        candidate = resolve_model(str(candidate), revision).path
    elif revision is not None and base_model is not None:
        raise QdoraError(f"--revision {revision} applies to Hub models, but {base_model} is a local folder")
    if not is_model_dir(candidate):
        raise QdoraError(f"{src} {str(candidate)!r} is not a local model folder (config.json + safetensors) "
                         "nor a Hub repository id: pass --base-model DIR")
    return Path(candidate)


@dataclass
class AdapterMerge:
    """An adapter checked against its base: everything needed to merge one weight at a time."""

    adapter_dir: Path
    base_dir: Path
    spec: AdapterSpec
    scale: float
    reader: WeightReader
    linear_keys: set[str] = field(default_factory=set)
    # weights the base checkpoint holds pre-quantized (bitsandbytes NF4): no full-precision copy exists
    prequantized: set[str] = field(default_factory=set)
    # weight key -> (A, B, magnitude or None), all small
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    @classmethod
    def load(cls, adapter_dir: str | Path, base_model: str | Path | None = None,
             revision: str | None = None, check_base: Callable[[Path], None] | None = None) -> AdapterMerge:
        """The adapter, its base's reader and targets; `check_base(base_dir)` runs before the base is built."""
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.is_dir():
            raise QdoraError(f"adapter folder {adapter_dir} does not exist")
        spec, cfg = read_adapter_config(adapter_dir)
        base_dir = resolve_base_dir(base_model, cfg, revision=revision)
        if check_base is not None:
            check_base(base_dir)
        reader = WeightReader(base_dir)
        model = meta_model(base_dir)
        experts = expert_keys(model)
        linears = {p + ".weight" for p in linear_names_in_blocks(model)} | set(experts)
        targets = find_targets(model, spec.target)
        tensors = load_adapter_tensors(adapter_dir)
        plan = cls(adapter_dir, base_dir, spec, adapter_scale(spec.r, spec.alpha, spec.rslora), reader, linears)
        if bnb_format(base_dir) is not None:
            plan.prequantized = quantized_weights(reader.keys())
        plan._attach(tensors, targets, experts)
        missing = sorted(k for k in linears if k not in reader)
        if missing:
            raise QdoraError(f"{base_dir} lacks weights its config implies, e.g. {missing[0]}")
        return plan

    def _attach(self, tensors: dict, targets: list[str], experts: dict[str, tuple[str, int, slice]]) -> None:
        """Group the adapter tensors by weight and check them against the base's shapes; an expert
        adapter ([E, ...] tensors of a fused parameter) is split into its per-expert checkpoint tensors."""
        paths = {p for p, _ in tensors}
        unknown = sorted(paths - set(targets))
        if unknown:
            raise QdoraError(f"adapter {self.adapter_dir} does not fit {self.base_dir}: "
                             f"no such target module {unknown[0]!r}")
        for path in targets:
            if any(p == path for p, _, _ in experts.values()):
                self._attach_experts(path, tensors, experts)
                continue
            key = path + ".weight"
            if key not in self.reader:
                raise QdoraError(f"{self.base_dir} has no tensor {key} that the adapter targets")
            out, inn = self.shape(key)
            self.adapters[key] = self._fitting(path, tensors, adapter_shapes(inn, out, self.spec.r, self.spec.method))

    def _fitting(self, path: str, tensors: dict, want: dict[str, tuple[int, ...]]) -> tuple:
        """`path`'s (A, B, magnitude), each checked against the shape the base needs (None where unused)."""
        for name, shape in want.items():
            t = tensors.get((path, name))
            if t is None:
                raise QdoraError(f"adapter {self.adapter_dir} does not fit {self.base_dir}: {path} has no {name}")
            if tuple(t.shape) != shape:
                raise QdoraError(f"adapter {self.adapter_dir} does not fit {self.base_dir}: {path}.{name} "
                                 f"has shape {tuple(t.shape)}, the base needs {shape}")
        return tuple(tensors.get((path, name)) if name in want else None for name in ADAPTER_ATTRS)

    def _attach_experts(self, path: str, tensors: dict, experts: dict[str, tuple[str, int, slice]]) -> None:
        keys = {k: v for k, v in experts.items() if v[0] == path}
        num = 1 + max(e for _, e, _ in keys.values())
        out = sum(self.shape(k)[0] for k, (_, e, _) in keys.items() if e == 0)
        inn = self.shape(next(iter(keys)))[1]
        want = {name: (num, *shape) for name, shape in adapter_shapes(inn, out, self.spec.r, self.spec.method).items()}
        a, b, m = self._fitting(path, tensors, want)
        for key, (_, e, rows) in keys.items():  # DoRA's norm is per row: each part merges on its own
            self.adapters[key] = (a[e], b[e][rows], None if m is None else m[e][rows])

    def check_base_kind(self, base: str) -> None:
        """`original` needs full-precision weights, which a pre-quantized base does not have."""
        if base == "original" and self.prequantized:
            raise QdoraError(f"the base {self.base_dir} is a pre-quantized bitsandbytes NF4 checkpoint: it holds no "
                             "full-precision weights, so --base original is impossible; the dequantized base "
                             "(the default, the weights training saw) is the only one")

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape as the model sees it ([out, in] for a pre-quantized weight, not its packed bytes)."""
        return logical_shape(self.reader, key) if key in self.prequantized else self.reader.shape(key)

    def weight(self, key: str) -> torch.Tensor:
        """One base tensor as the model sees it: a pre-quantized weight dequantized (fp32), else as stored."""
        if key in self.prequantized:
            return read_parts(self.reader, key).dequantize(torch.float32)
        return self.reader.get(key)

    def tensors(self):
        """(name, tensor) of the base in file order, one at a time: quant-state companions folded into their
        (dequantized) weight."""
        for key in self.reader.keys():  # noqa: SIM118 (file order; the reader is not iterable)
            if companion_of(key) not in self.prequantized:
                yield key, self.weight(key)

    def headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, safetensors dtype) of the tensors `tensors()` yields, from the headers only."""
        heads = self.reader.headers()
        return {k: ((logical_shape(self.reader, k), "F32") if k in self.prequantized else h)
                for k, h in heads.items() if companion_of(k) not in self.prequantized}

    def base_weight(self, key: str, w: torch.Tensor, base: str = "dequantized") -> torch.Tensor:
        """fp32 W: the NF4 round trip training saw (dequantized) or the checkpoint's own (original).
        A pre-quantized weight (`w` from `weight`) is already that round trip."""
        if key in self.prequantized:
            self.check_base_kind(base)
            return w.float()
        if base == "original":
            return w.float()
        return nf4_from_weight(w.float(), double_quant=self.spec.double_quant).dequantize(torch.float32)

    def output_tensor(self, key: str, tensor: torch.Tensor, base: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor of the merged model, as `qdora merge` writes it and the one-step export converts it:
        `tensor` from `weight`/`tensors`, a weight key merged onto its base, floating tensors cast to `dtype`."""
        if key in self.linear_keys:
            tensor = self.merged(key, self.base_weight(key, tensor, base))
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def merged(self, key: str, w_base: torch.Tensor) -> torch.Tensor:
        """fp32 W' for a weight key: the adapter merged onto `w_base`, or `w_base` if not targeted."""
        if key not in self.adapters:
            return w_base
        a, b, m = self.adapters[key]
        return merge_weight(w_base, a, b, m, self.scale)


def edited_config(model_dir: Path, dtype: torch.dtype) -> dict:
    """config.json for the merged model: no quantization_config, dtype set to what was written."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    return cfg
