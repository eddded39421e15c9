"""Adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT is what the ecosystem reads (vLLM, TGI, `PeftModel.from_pretrained`), so our adapters are PEFT
adapters: key names `base_model.model.<path>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector`, and a config with `peft_type: LORA`, `use_dora`, `r`, `lora_alpha`, ...
qdora's own record (how the base was quantized, the adapter dtype) goes to a `qdora_adapter.json` beside
it: PEFT warns about keys it does not know in its config. Adapters made by PEFT load here too, from
safetensors only (`adapter_model.bin` is a pickle: loading it could run code). Files are written to a
temporary name and renamed, so an interrupted save never leaves a half-written adapter.

Saving and loading work on whole tensors (`qdora.core.shards`): under FSDP2 every rank calls
`adapter_state_dict` (a gather) and `load_adapter_weights` (each rank keeps its rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qdora.core.adapt import ALL_LINEAR, AdapterSpec, adapt_model, adapter_layers, targeted_expert_params
from qdora.core.expert_adapter_io import PEFT_EXPERT_KEY as EXPERT_KEY
from qdora.core.expert_adapter_io import (
    expert_peft_keys,
    from_peft_layout,
    parse_expert_key,
    split_expert_path,
    target_parameters,
    to_peft_layout,
)
from qdora.core.layer import ADAPTER_ATTRS
from qdora.core.nf4 import BLOCKSIZE
from qdora.core.shards import fill_param, whole
from qdora.errors import QdoraError
from qdora.io.atomic import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
QDORA_NAME = "qdora_adapter.json"
PREFIX = "base_model.model."
# PEFT's key suffix for each of our adapter attributes (same order as ADAPTER_ATTRS)
_ATTR_TO_SUFFIX = dict(zip(ADAPTER_ATTRS, (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"),
                           strict=True))
_SUFFIX_TO_ATTR = {suffix: attr for attr, suffix in _ATTR_TO_SUFFIX.items()}
_OLD_MAGNITUDE_SUFFIX = ".lora_magnitude_vector.weight"  # older PEFT versions


def peft_key(path: str, attr: str) -> str:
    """PEFT's key for one adapter tensor: (`<path>`, `lora_A`) -> `base_model.model.<path>.lora_A.weight`."""
    return PREFIX + path + _ATTR_TO_SUFFIX[attr]


def peft_state(tensors: dict[tuple[str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """(module path, attr) -> tensor, as qdora holds them, to PEFT's keys and layouts (experts included)."""
    expert_keys = expert_peft_keys([k for k in tensors if split_expert_path(k[0])])
    state = {}
    for (path, attr), t in tensors.items():
        if (path, attr) in expert_keys:
            state[PREFIX + expert_keys[(path, attr)]] = to_peft_layout(attr, t)
        else:
            state[peft_key(path, attr)] = t.contiguous()
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names and layouts, whole, on the CPU (a gather under FSDP2: every
    rank calls it)."""
    tensors = {}
    for path, layer in adapter_layers(model).items():
        for attr, p in layer.adapter_tensors().items():
            tensors[(path, attr)] = whole(p).to("cpu").clone()
    return peft_state(tensors)


def _module_path(key: str) -> str:
    """`base_model.model.<path>.lora_A.weight` -> `<path>`."""
    for suffix in _SUFFIX_TO_ATTR:
        if key.endswith(suffix):
            return key[len(PREFIX): -len(suffix)]
    raise QdoraError(f"unexpected adapter key {key!r}")


def peft_config_dict(spec: AdapterSpec, target_names: list[str], base_model: str | None,
                     provenance: dict | None = None, expert_params: list[str] | None = None) -> dict:
    """The adapter_config.json PEFT expects (only fields we set; PEFT fills its defaults).

    `provenance` ({"model": {"name", "revision"}, "data": ...}) is what the run was trained on: the base
    model's Hub commit goes into PEFT's own `revision` field (PeftModel.from_pretrained then loads that
    commit of the base), the whole record into qdora's own `qdora_adapter.json` (`qdora_record`).
    `expert_params` are PEFT's `target_parameters` (fused MoE expert weights).
    """
    extra = {"target_parameters": expert_params} if expert_params else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": ((provenance or {}).get("model") or {}).get("revision"),
        "r": int(spec.r),
        "lora_alpha": spec.alpha,
        "lora_dropout": float(spec.dropout),
        "use_rslora": bool(spec.rslora),
        "use_dora": spec.method == "dora",
        "target_modules": sorted(target_names),
        **extra,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def qdora_record(spec: AdapterSpec, provenance: dict | None = None) -> dict:
    """qdora's own record of how the base was quantized and what the run read (`qdora_adapter.json`: PEFT
    warns about unknown keys in its config, so they are not there)."""
    own = {"method": spec.method, "double_quant": spec.double_quant, "quant_type": "nf4",
           "blocksize": BLOCKSIZE, "adapter_dtype": spec.adapter_dtype}
    if provenance:
        own["provenance"] = provenance
    return own


def save_adapter(
    model: nn.Module, out_dir: str | Path, spec: AdapterSpec, base_model: str | None = None,
    state: dict[str, torch.Tensor] | None = None, provenance: dict | None = None,
) -> Path:
    """Write the adapter in PEFT format (+ qdora_adapter.json); `state` (from `adapter_state_dict`, e.g.
    gathered on every rank of an FSDP2 run) replaces reading the model; `provenance` records the model/data
    revisions (see `peft_config_dict`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    if not state:
        raise QdoraError("the model has no QDoRA layers: nothing to save")
    experts = {m.group("experts") for k in state if (m := EXPERT_KEY.match(k[len(PREFIX):]))}
    targets = sorted({_module_path(k).rsplit(".", 1)[-1] for k in state if not EXPERT_KEY.match(k[len(PREFIX):])})
    expert_paths = [f"{e}.{p}" for e in experts for p in targeted_expert_params(spec.target, e)]
    config = peft_config_dict(spec, targets, base_model, provenance, target_parameters(expert_paths))
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    record = qdora_record(spec, provenance)
    atomic_write(out / QDORA_NAME, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return out


def read_adapter_config(adapter_dir: str | Path) -> tuple[AdapterSpec, dict]:
    """The AdapterSpec an adapter folder (ours or PEFT's) was made with, plus its raw config."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise QdoraError(f"{adapter_dir} is not an adapter folder: {CONFIG_NAME} is missing")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QdoraError(f"{path} is not valid JSON: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QdoraError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA/DoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise QdoraError(f"{path}: per-module {key} is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise QdoraError(f"{path}: trained biases / modules_to_save are not supported")
    targets = cfg.get("target_modules") or ALL_LINEAR
    params = [p.rpartition(".")[2] for p in cfg.get("target_parameters") or []]
    if params:
        if isinstance(targets, str) and targets != ALL_LINEAR:
            raise QdoraError(f"{path}: a regex target_modules with target_parameters is not supported")
        targets = [targets] if isinstance(targets, str) else list(targets)
        targets += sorted({f"experts.{p}" for p in params})
    own = _read_qdora_record(Path(adapter_dir)) or cfg.get("qdora", {})  # the key: adapters of qdora <= 0.1
    spec = AdapterSpec(
        method="dora" if cfg.get("use_dora") else "lora",
        r=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", cfg["r"])),
        rslora=bool(cfg.get("use_rslora", False)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target=targets if isinstance(targets, str) else list(targets),
        double_quant=bool(own.get("double_quant", True)),
        adapter_dtype=own.get("adapter_dtype", "float32"),
    )
    return spec, cfg


def _read_qdora_record(adapter_dir: Path) -> dict:
    path = adapter_dir / QDORA_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QdoraError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise QdoraError(f"{path} is not a JSON object")
    return record


def load_adapter_tensors(adapter_dir: str | Path) -> dict[tuple[str, str], torch.Tensor]:
    """The adapter tensors keyed by (module path, attribute), from PEFT-format safetensors (expert tensors
    in qdora's [E, ...] layout)."""
    cfg_path = Path(adapter_dir) / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    expert_params = [p.rpartition(".")[2] for p in cfg.get("target_parameters") or []]
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            raise QdoraError(
                f"{adapter_dir} holds adapter_model.bin, a pickle file (loading one can run code), and no "
                f"{WEIGHTS_NAME}: qdora reads safetensors only. If you trust its origin, re-save it with PEFT "
                "(PeftModel.from_pretrained(...).save_pretrained(dir), which writes safetensors)")
        raise QdoraError(f"{adapter_dir} has no {WEIGHTS_NAME}")
    try:
        raw = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
        raise QdoraError(f"cannot read {path} as safetensors: {e}") from e
    out = {}
    for key, tensor in raw.items():
        if not key.startswith(PREFIX):
            raise QdoraError(f"unexpected adapter key {key!r} (expected the prefix {PREFIX!r})")
        body = key[len(PREFIX):].replace(".default.", ".")  # older PEFT kept the adapter name
        expert = parse_expert_key(body, expert_params)
        if expert is not None:
            out[expert] = from_peft_layout(expert[1], tensor, int(cfg["r"]))
            continue
        for suffix, attr in _SUFFIX_TO_ATTR.items():
            if body.endswith(suffix):
                out[(body[: -len(suffix)], attr)] = tensor
                break
        else:
            if body.endswith(_OLD_MAGNITUDE_SUFFIX):
                out[(body[: -len(_OLD_MAGNITUDE_SUFFIX)], _SUFFIX_TO_ATTR[".lora_magnitude_vector"])] = tensor
            else:
                raise QdoraError(f"unexpected adapter key {key!r}")
    return out


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy an adapter folder's tensors into an already adapted model (each rank its rows under FSDP2)."""
    fill_adapter(model, load_adapter_tensors(adapter_dir), adapter_dir)


@torch.no_grad()
def fill_adapter(model: nn.Module, tensors: dict[tuple[str, str], torch.Tensor], source: str | Path) -> None:
    """Copy adapter tensors (from `load_adapter_tensors`) into an already adapted model, each rank its rows
    under FSDP2; every layer must be covered and every shape fit (`source` names them in errors)."""
    layers = adapter_layers(model)
    missing = [(p, a) for p, layer in layers.items() for a in layer.adapter_tensors() if (p, a) not in tensors]
    unknown = [p for p, _ in tensors if p not in layers]
    if missing or unknown:
        raise QdoraError(
            f"adapter {source} does not fit this model: "
            + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} " if missing else "")
            + (f"no such adapted module {unknown[:3]}" if unknown else "")
        )
    for (path, attr), tensor in tensors.items():
        param = getattr(layers[path], attr)
        if param is None:
            raise QdoraError(f"{path} has no {attr} (adapter method does not match the model's layers)")
        if param.shape != tensor.shape:
            raise QdoraError(f"{path}.{attr}: adapter shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
        fill_param(param, tensor)


def apply_adapter(model: nn.Module, adapter_dir: str | Path, storage_dtype: torch.dtype | None = None):
    """Adapt a full-precision model as the adapter's config says, then load the adapter's weights."""
    spec, _ = read_adapter_config(adapter_dir)
    report = adapt_model(model, spec, storage_dtype)
    load_adapter_weights(model, adapter_dir)
    return spec, report
