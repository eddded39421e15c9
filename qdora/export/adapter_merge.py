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

from qdora.core.adapt import AdapterSpec, find_targets, linear_names_in_blocks
from qdora.core.adapter_io import load_adapter_tensors, read_adapter_config
from qdora.core.layer import ADAPTER_ATTRS, adapter_scale, adapter_shapes, merge_weight
from qdora.core.load import meta_model
from qdora.core.nf4 import nf4_from_weight
from qdora.errors import QdoraError
from qdora.io.weights import WeightReader, is_model_dir


def block_linear_keys(model_dir: Path) -> list[str]:
    """Checkpoint keys (`<path>.weight`) of every linear inside the decoder blocks."""
    return [p + ".weight" for p in linear_names_in_blocks(meta_model(model_dir))]


def resolve_base_dir(base_model: str | Path | None, adapter_cfg: dict, what: str = "adapter",
                     revision: str | None = None) -> Path:
    """--base-model (at --revision), else the adapter config's base_model_name_or_path at its recorded
    `revision`: a local model folder, or a Hub repository id fetched through the Hub cache."""
    from qdora.io.hub import looks_like_repo_id, resolve_model

    candidate = base_model if base_model is not None else adapter_cfg.get("base_model_name_or_path")
    if not candidate:
        raise QdoraError(f"the {what} config names no base model: pass --base-model DIR")
    src = "--base-model" if base_model is not None else f"the {what} config's base_model_name_or_path"
    if revision is None and base_model is None:
        revision = adapter_cfg.get("revision")
    if not Path(candidate).exists() and "/" in str(candidate) and looks_like_repo_id(str(candidate)):
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
        linears = {p + ".weight" for p in linear_names_in_blocks(model)}
        targets = find_targets(model, spec.target)
        tensors = load_adapter_tensors(adapter_dir)
        plan = cls(adapter_dir, base_dir, spec, adapter_scale(spec.r, spec.alpha, spec.rslora), reader, linears)
        plan._attach(tensors, targets)
        missing = sorted(k for k in linears if k not in reader)
        if missing:
            raise QdoraError(f"{base_dir} lacks weights its config implies, e.g. {missing[0]}")
        return plan

    def _attach(self, tensors: dict, targets: list[str]) -> None:
        """Group the adapter tensors by weight and check them against the base's shapes."""
        paths = {p for p, _ in tensors}
        unknown = sorted(paths - set(targets))
        if unknown:
            raise QdoraError(f"adapter {self.adapter_dir} does not fit {self.base_dir}: "
                             f"no such target module {unknown[0]!r}")
        for path in targets:
            key = path + ".weight"
            if key not in self.reader:
                raise QdoraError(f"{self.base_dir} has no tensor {key} that the adapter targets")
            out, inn = self.reader.shape(key)
            want = adapter_shapes(inn, out, self.spec.r, self.spec.method)
            for name, shape in want.items():
                t = tensors.get((path, name))
                if t is None:
                    raise QdoraError(f"adapter {self.adapter_dir} does not fit {self.base_dir}: {path} has no {name}")
                if tuple(t.shape) != shape:
                    raise QdoraError(f"adapter {self.adapter_dir} does not fit {self.base_dir}: {path}.{name} "
                                     f"has shape {tuple(t.shape)}, the base needs {shape}")
            a, b, m = (tensors.get((path, name)) if name in want else None for name in ADAPTER_ATTRS)
            self.adapters[key] = (a, b, m)

    def base_weight(self, key: str, w: torch.Tensor, base: str = "dequantized") -> torch.Tensor:
        """fp32 W: the NF4 round trip training saw (dequantized) or the checkpoint's own (original)."""
        if base == "original":
            return w.float()
        return nf4_from_weight(w.float(), double_quant=self.spec.double_quant).dequantize(torch.float32)

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
