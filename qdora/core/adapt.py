"""Put QDoRA layers into a transformers causal LM: pick targets, quantize, freeze the rest.

Targets are the `nn.Linear` modules inside the decoder blocks (q/k/v/o, gate/up/down for Llama,
Mistral, Qwen2); `lm_head` and embeddings are never adapted. A module on the meta device is replaced by
an empty layer on meta (the streaming loader fills it); a real one is quantized on its own device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qdora.core.experts import ExpertsAdapter, NF4Experts
from qdora.core.layer import NF4Linear, QDoRALinear
from qdora.core.moe_families import EXPERT_PARAMS, MoEFamily, moe_family_of
from qdora.core.nf4 import NF4Weight
from qdora.errors import QdoraError
from qdora.options import ADAPTER_DTYPE, ALL_LINEAR, METHOD, parse_target, select_targets, torch_dtype


@dataclass
class AdapterSpec:
    """What to adapt and how: the options a user chooses (and that adapter_config.json records)."""

    method: str = "dora"
    r: int = 16
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    target: str | list[str] = ALL_LINEAR
    double_quant: bool = True
    adapter_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        METHOD.check(self.method)
        parse_target(self.target)
        if int(self.r) < 1:
            raise QdoraError(f"rank must be a positive integer, not {self.r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise QdoraError(f"dropout must be in [0, 1), not {self.dropout}")
        ADAPTER_DTYPE.check(self.adapter_dtype)

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return torch_dtype(self.adapter_dtype)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdaptReport:
    """What `adapt_model` did, for logs and the CLI."""

    adapted: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    @property
    def target_names(self) -> list[str]:
        return sorted({path.rsplit(".", 1)[-1] for path in self.adapted})

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"adapted {len(self.adapted)} linear layers ({', '.join(self.target_names)}); "
                f"trainable {self.trainable_params:,} of {self.total_params:,} parameters ({pct:.3f}%)")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a transformers causal LM (model.model.layers for Llama)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise QdoraError(
            f"{type(model).__name__} has no decoder block list (expected model.get_decoder().layers): "
            "qdora adapts Llama, Mistral and Qwen2-style causal LMs"
        )
    return blocks


def _block_prefix(model: nn.Module) -> str:
    blocks = decoder_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise QdoraError("decoder blocks are not reachable from the model root")


def linear_names_in_blocks(model: nn.Module) -> list[str]:
    """Paths of every linear (plain or already adapted) inside the decoder blocks, except the MoE gates a
    family keeps in full precision (Qwen2-MoE's shared_expert_gate)."""
    prefix = _block_prefix(model) + "."
    family = moe_family_of(model)
    keep = family.keep_linears if family is not None else ()
    return [n for n, m in model.named_modules()
            if n.startswith(prefix) and isinstance(m, (nn.Linear, QDoRALinear, NF4Linear))
            and n.rsplit(".", 1)[-1] not in keep]


def experts_in_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Paths of the fused experts modules (transformers' or already `NF4Experts`) of an MoE model."""
    family = moe_family_of(model)
    if family is None:
        return {}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, NF4Experts) or type(m).__name__ == family.experts_class}


def expert_param_paths(model: nn.Module) -> list[str]:
    """`<experts path>.gate_up_proj` and `.down_proj` for every experts module: what `--target` can name."""
    return [f"{path}.{param}" for path in experts_in_blocks(model) for param in EXPERT_PARAMS]


def targeted_expert_params(target: str | list[str], experts_path: str) -> list[str]:
    """The fused parameters of the experts module at `experts_path` that `target` adapts."""
    return [p.rsplit(".", 1)[-1] for p in parse_target(target).select([f"{experts_path}.{q}" for q in EXPERT_PARAMS])]


def find_targets(model: nn.Module, target: str | list[str]) -> list[str]:
    """Module paths to adapt, in the target grammar of `qdora.options.parse_target`: linears, and for MoE
    models the fused expert parameters when `experts` / `experts.<param>` (or a regex) names them."""
    return select_targets(target, linear_names_in_blocks(model) + expert_param_paths(model), type(model).__name__)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at dotted `path` (e.g. model.layers.0.mlp.up_proj) with `module`."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def layer_seed(seed: int, index: int) -> int:
    """The init seed of the `index`-th adapted layer (in module order) of a model adapted with `seed`."""
    return seed * 1_000_003 + index


def make_layer(linear: nn.Linear, spec: AdapterSpec, storage_dtype: torch.dtype | None = None, seed: int = 0
               ) -> QDoRALinear:
    """A QDoRALinear for `linear` with adapter `initial_adapter(seed)`: quantized from its weight, or empty on
    meta for streaming loads (the loader inits it with the same seed)."""
    return QDoRALinear.from_linear(
        linear, seed=seed, r=int(spec.r), alpha=float(spec.alpha), method=spec.method, rslora=spec.rslora,
        dropout=float(spec.dropout), double_quant=spec.double_quant, adapter_dtype=spec.torch_adapter_dtype,
        storage_dtype=storage_dtype,
    )


def make_frozen(linear: nn.Linear, spec: AdapterSpec, storage_dtype: torch.dtype | None = None) -> NF4Linear:
    """A frozen NF4Linear for an untargeted linear (empty on meta for streaming loads)."""
    return NF4Linear.from_linear(linear, spec.double_quant, storage_dtype)


def make_experts(module: nn.Module, family: MoEFamily, spec: AdapterSpec, targets: set[str], path: str,
                 storage_dtype: torch.dtype | None = None) -> NF4Experts:
    """NF4 experts for transformers' fused experts module, with (uninitialised) adapters on the targeted
    fused parameters: `adapt_model` inits them in module order."""
    new = NF4Experts.from_experts(module, family, spec.double_quant, storage_dtype)
    for param in EXPERT_PARAMS:
        if f"{path}.{param}" in targets:
            new.add_adapter(param, int(spec.r), float(spec.alpha), spec.method, spec.rslora,
                            spec.torch_adapter_dtype, module.gate_up_proj.device)
    return new


def adapt_model(
    model: nn.Module, spec: AdapterSpec, storage_dtype: torch.dtype | None = None, seed: int = 0
) -> AdaptReport:
    """Quantize every linear of the decoder blocks to NF4 (in place), put adapters on the targeted ones,
    and freeze everything else. Untargeted linears become frozen `NF4Linear`s, as in QLoRA.

    The i-th adapted layer starts from `initial_adapter(layer_seed(seed, i))`, exactly as `load_model`
    with the same seed inits it."""
    report = AdaptReport()
    targets = set(find_targets(model, spec.target))
    family = moe_family_of(model)
    for path, module in experts_in_blocks(model).items():
        if isinstance(module, NF4Experts):
            raise QdoraError(f"{path} is already quantized/adapted")
        set_submodule(model, path, make_experts(module, family, spec, targets, path, storage_dtype))
        report.adapted += [f"{path}.{p}" for p in EXPERT_PARAMS if f"{path}.{p}" in targets]
    for path in linear_names_in_blocks(model):
        module = model.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise QdoraError(f"{path} is already quantized/adapted")
        if path in targets:
            set_submodule(model, path, make_layer(module, spec, storage_dtype,
                                                  layer_seed(seed, len(report.adapted))))
            report.adapted.append(path)
        else:
            set_submodule(model, path, make_frozen(module, spec, storage_dtype))
        del module
    if family is not None and next(model.parameters()).device.type != "meta":
        init_adapters(model, seed)  # experts were adapted first: re-init every adapter by its module-order index
    freeze_base(model)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params = count_parameters(model)
    return report


def init_adapters(model: nn.Module, seed: int) -> None:
    """Every adapter from its `initial_adapter(layer_seed(seed, i))`, i its index in module order: how
    `adapt_model(..., seed)` makes them and how `load_model` inits a streamed model."""
    for i, layer in enumerate(adapter_layers(model).values()):
        layer.reset_adapter(layer_seed(seed, i))


def freeze_base(model: nn.Module) -> None:
    """Only adapter tensors (`ADAPTER_ATTRS`) train; base weights, biases, norms are frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)


def adapter_layers(model: nn.Module) -> dict[str, QDoRALinear | ExpertsAdapter]:
    """Every adapter of the model by module path: QDoRA linears and expert adapters (`...experts.gate_up_proj`).

    Both have `lora_A`, `lora_B`, `magnitude` (or None) and `adapter_parameters()`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QDoRALinear, ExpertsAdapter))}


def count_parameters(model: nn.Module) -> int:
    """Parameters as the user thinks of them: an NF4 weight counts out×in, not its packed bytes."""
    total = 0
    for module in model.modules():
        if isinstance(module, NF4Weight):
            total += module.spec.out_features * module.spec.in_features
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total
