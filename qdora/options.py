"""Every named choice a user makes, defined and checked in one place.

`qdora train`, `plan`, `merge` and `analyze`, the YAML config and the Python API all take these values as
plain strings and check them here, so each one has one list of allowed values, one error message (a
`QdoraError`: exit status 1 on the command line) and one meaning. Torch is imported lazily: the CLI's
`--help` should not pay for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qdora.errors import QdoraError


@dataclass(frozen=True)
class Choice:
    """One option with a fixed set of values."""

    name: str  # as the user knows it: the flag without dashes, with dashes between words
    values: tuple[str, ...]

    def check(self, value: str) -> str:
        """`value` if allowed, else one clear error naming every allowed value."""
        if value not in self.values:
            raise QdoraError(f"unknown {self.name} {value!r}: choose one of {', '.join(self.values)}")
        return value

    @property
    def metavar(self) -> str:
        return "|".join(self.values)


METHOD = Choice("method", ("dora", "lora"))
OFFLOAD = Choice("offload", ("none", "activations", "params", "all"))
DTYPE = Choice("dtype", ("bf16", "fp16", "fp32"))
SCHEDULER = Choice("scheduler", ("cosine", "linear", "constant"))
DATA_FORMAT = Choice("format", ("auto", "text", "alpaca", "chat"))
REPORTERS = ("tensorboard", "wandb", "mlflow")  # --report-to: any of these, comma-separated, or none / all
LOSS = Choice("loss", ("chunked", "full"))
BASE = Choice("base", ("dequantized", "original"))  # the W an adapter is merged onto / compared against
LM_HEAD = Choice("lm-head", ("dense", "nf4"))  # the frozen output layer: compute dtype, or NF4 (vocab-sliced loss)
EMBEDDINGS = Choice("embeddings", ("host", "device"))  # where the frozen input embedding table lives
OPTIM = Choice("optim", ("adamw", "adamw8bit", "paged_adamw8bit"))
ON_SPIKE = Choice("on-spike", ("warn", "stop"))

# The one dtype table: short names users type, and torch's names (what adapter_config.json records).
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ADAPTER_DTYPE = Choice("adapter dtype", tuple(TORCH_DTYPE_NAMES.values()))
TRAIN_ADAPTER_DTYPE = Choice("adapter-dtype", ("fp32", "bf16"))  # what `--adapter-dtype` accepts (short names)


def report_to(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The trackers of `--report-to`: `none`, `all`, or names from REPORTERS separated by commas (a YAML
    list works too); duplicates dropped, order kept."""
    parts = value if isinstance(value, (list, tuple)) else str(value or "none").split(",")
    names = [str(p).strip().lower() for p in parts if str(p).strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return REPORTERS
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise QdoraError(f"unknown report-to {bad[0]!r}: choose none, all, or any of {', '.join(REPORTERS)} "
                         "separated by commas")
    return tuple(dict.fromkeys(names))


def torch_dtype(name: str):
    """torch dtype for a short (bf16) or torch (bfloat16) name, case-insensitive."""
    import torch

    key = str(name).lower()
    key = {v: k for k, v in TORCH_DTYPE_NAMES.items()}.get(key, key)
    return getattr(torch, TORCH_DTYPE_NAMES[DTYPE.check(key)])


def offloads_params(offload: str) -> bool:
    """Whether FSDP2 keeps parameters (and their gradients and optimizer state) in host memory."""
    return OFFLOAD.check(offload) in ("params", "all")


def offloads_activations(offload: str) -> bool:
    """Whether the tensors saved for backward live in host memory."""
    return OFFLOAD.check(offload) in ("activations", "all")


# --- targets -------------------------------------------------------------------------------------------

ALL_LINEAR = "all-linear"
EXPERTS = "experts"  # MoE: both fused expert parameters; `experts.gate_up_proj` / `experts.down_proj`: one
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_LEAF_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|all-linear|experts\.(?:gate_up_proj|down_proj)")


def is_expert_path(path: str) -> bool:
    """`<...>.experts.gate_up_proj` / `.down_proj`: a fused MoE expert parameter, not a linear."""
    parts = path.rsplit(".", 2)
    return len(parts) == 3 and parts[1] == EXPERTS and parts[2] in EXPERT_PARAMS


def target_name_of(path: str) -> set[str]:
    """The names that pick `path`: its leaf for a linear; `experts` and `experts.<param>` for experts."""
    if is_expert_path(path):
        return {EXPERTS, EXPERTS + "." + path.rsplit(".", 1)[-1]}
    return {path.rsplit(".", 1)[-1]}


@dataclass(frozen=True)
class Target:
    """Which linears get an adapter: all of them, those with one of `names` as their last path part
    (q_proj, ...), or those whose whole module path matches `pattern` (PEFT's meaning of a string).
    MoE expert parameters are picked only by name (`experts`, `experts.<param>`) or by a pattern, never
    by `all-linear` or a linear's leaf name (`down_proj` is the dense MLP's)."""

    names: tuple[str, ...] | None = None
    pattern: re.Pattern | None = None

    def select(self, paths: list[str]) -> list[str]:
        """The module paths (model.layers.0.self_attn.q_proj, ...) this target picks, in order."""
        if self.pattern is not None:
            return [p for p in paths if self.pattern.fullmatch(p)]
        if self.names is not None:
            names = set(self.names)
            return [p for p in paths if target_name_of(p) & names
                    or (ALL_LINEAR in names and not is_expert_path(p))]
        return [p for p in paths if not is_expert_path(p)]


def parse_target(target: str | list[str] | tuple[str, ...]) -> Target:
    """The target grammar of every command: `all-linear`; one name or a comma list of names (q_proj,v_proj);
    any other string is a regular expression matched against whole module paths; a list is names."""
    if isinstance(target, (list, tuple)):
        names = [str(t).strip() for t in target]
    elif target == ALL_LINEAR:
        return Target()
    elif isinstance(target, str) and all(_LEAF_NAME.fullmatch(t) for t in _names(target)):
        names = _names(target)  # [] for "" or ",": refused below
    elif isinstance(target, str):
        try:
            return Target(pattern=re.compile(target))
        except re.error as e:
            raise QdoraError(f"target {target!r} is neither all-linear, a list of names nor a valid regex: {e}") \
                from e
    else:
        names = []
    if not names or not all(names):
        raise QdoraError(f"empty target {target!r}: use all-linear, names like q_proj,v_proj, or a regex")
    return Target(names=tuple(names))


def select_targets(target: str | list[str] | tuple[str, ...], paths: list[str], model_name: str) -> list[str]:
    """The paths `target` picks; an error if it picks none or one of its names matches nothing (a typo)."""
    parsed = parse_target(target)
    chosen = parsed.select(paths)
    found = {n for p in chosen for n in target_name_of(p)} | ({ALL_LINEAR} if chosen else set())
    missing = [n for n in parsed.names or () if n not in found]
    if not chosen or missing:
        leaves = sorted({n for p in paths for n in target_name_of(p)})
        raise QdoraError(
            f"no module of {model_name} matches target {', '.join(missing) if missing else repr(target)}; the "
            f"linear modules in its decoder blocks are: {', '.join(leaves) if leaves else 'none'}"
        )
    return chosen


def _names(target: str) -> list[str]:
    return [t.strip() for t in target.split(",") if t.strip()]
