"""Every option of `qdora train` in one dataclass: defaults, help text, YAML files, validation.

The CLI builds its options from these fields (one place documents each option and its default), a
`--config FILE.yaml` supplies values under the same names (dashes or underscores), and flags given on the
command line override the file. The resolved config is written to OUTPUT/train_config.yaml.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qdora.errors import QdoraError
from qdora.options import (
    DATA_FORMAT,
    DTYPE,
    EMBEDDINGS,
    LM_HEAD,
    METHOD,
    OFFLOAD,
    ON_SPIKE,
    OPTIM,
    SCHEDULER,
    TRAIN_ADAPTER_DTYPE,
    offloads_activations,
    offloads_params,
    parse_target,
    report_to,
    torch_dtype,
)

# The options of TrainConfig that take one of a fixed set of values (qdora/options.py checks them).
CHOICES = {"method": METHOD, "scheduler": SCHEDULER, "format": DATA_FORMAT, "offload": OFFLOAD, "dtype": DTYPE,
           "adapter_dtype": TRAIN_ADAPTER_DTYPE, "optim": OPTIM, "lm_head": LM_HEAD, "embeddings": EMBEDDINGS,
           "on_spike": ON_SPIKE}


RESOLVED_KEY = "resolved"  # train_config.yaml's record of resolved revisions; not an option


def _opt(default: Any, help: str, **extra) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Options of one training run (names are the CLI flags with dashes turned into underscores)."""

    model: str = _opt(None, "Base model: a folder (config.json, tokenizer, safetensors, single or index-sharded) "
                            "or a Hub id org/name (downloaded to the HF cache; a local folder wins).")
    revision: str = _opt(None, "Hub branch, tag or commit of --model (default: main).")
    data: str = _opt(None, "Training data: a file (json/jsonl/parquet/csv/txt), a folder of them, save_to_disk, "
                           "or a dataset repository (Hub id org/name, or a folder laid out like one).")
    data_split: str = _opt("train", "Split of a dataset repository --data.")
    data_config: str = _opt(None, "Config (subset) name of a dataset repository --data (and of --eval-split).")
    data_revision: str = _opt(None, "Hub branch, tag or commit of a dataset --data (and of --eval-split).")
    output: str = _opt(None, "Run folder: final adapter (PEFT format), checkpoints, metrics.jsonl, config.")
    method: str = _opt("dora", "Adapter: dora (QDoRA) or lora (QLoRA).")
    rank: int = _opt(16, "Adapter rank r.")
    alpha: float = _opt(16.0, "Adapter alpha (scale alpha/r, or alpha/sqrt(r) with --rslora).")
    rslora: bool = _opt(False, "rsLoRA scaling alpha/sqrt(r).", flag=True)
    dropout: float = _opt(0.0, "Dropout on the adapter's input.")
    target: str = _opt("all-linear", "Modules to adapt: all-linear, names (q_proj or q_proj,v_proj), or a regex on "
                                     "whole module paths (model.layers.0.mlp.up_proj).")
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).")
    scheduler: str = _opt("cosine", "LR schedule after warmup: cosine, linear (both decay to 0) or constant.")
    warmup_steps: int = _opt(0, "Linear warmup steps from 0 to --lr.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    epochs: int = _opt(1, "Passes over the data (ignored when --max-steps is set).")
    max_steps: int = _opt(None, "Optimizer steps to run (the data repeats as needed); overrides --epochs.")
    seq_len: int = _opt(2048, "Tokens per row; longer examples are truncated with a warning; must not exceed "
                              "the model's max_position_embeddings.")
    micro_batch: int = _opt(1, "Rows per forward pass per process.")
    grad_accum: int = _opt(1, "Micro batches per optimizer step (global batch = micro_batch × grad_accum × ranks).")
    packing: bool = _opt(True, "Pack examples into full seq_len rows (attention never crosses examples).", flag=True)
    format: str = _opt("auto", "Data format: auto, text, alpaca or chat.")
    completion_only: bool = _opt(False, "Train only on responses (alpaca output / assistant turns).", flag=True)
    eval_data: str = _opt(None, "Held-out data, prepared like --data; eval loss goes to metrics.jsonl.")
    eval_split: str = _opt(None, "Split for evaluation: of --eval-data if it is a dataset repository (default: "
                                 "train), else of --data's repository (e.g. test).")
    eval_every: int = _opt(None, "Evaluate every N steps (default: only at the end, when --eval-data is set).")
    save_every: int = _opt(None, "Write OUTPUT/checkpoint-STEP every N steps (default: never, only the final adapter).")
    keep: int = _opt(2, "Keep only the last K checkpoints (0 keeps all).")
    resume: str = _opt(None, "Resume from a checkpoint folder, or 'latest' (the newest in OUTPUT).")
    seed: int = _opt(0, "Seed for adapter init, data order, dropout.")
    offload: str = _opt("none", "CPU offload: none, activations (saved tensors), params (FSDP2 CPUOffloadPolicy), all.")
    gradient_checkpointing: bool = _opt(True, "Recompute each decoder layer in backward (non-reentrant).", flag=True)
    dtype: str = _opt("bf16", "Compute dtype: bf16, fp16 or fp32 (adapters: see --adapter-dtype).")
    adapter_dtype: str = _opt("fp32", "Adapter weights, gradients and AdamW states: fp32 (master weights) or bf16 "
                                      "(half the memory; updates below bf16 resolution are lost).")
    optim: str = _opt("adamw", "Optimizer: adamw (torch; fused on CUDA), adamw8bit or paged_adamw8bit "
                               "(bitsandbytes 8-bit states, one process; paged pages only on CUDA).")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this once per optimizer step, after "
                                     "accumulation (0 = off; the norm is logged either way).")
    spike_factor: float = _opt(0.0, "A loss above this many times the median of the last 20 good steps is a "
                                    "spike (0 = off; NaN/inf always stops); see --on-spike.")
    on_spike: str = _opt("warn", "On a loss spike: warn (naming the step and the last good checkpoint) or stop "
                                 "before that update.")
    lm_head: str = _opt("dense", "Frozen lm_head: dense (compute dtype) or nf4 (4x smaller; the loss walks the "
                                 "vocabulary in slices; the merged model keeps the original head).")
    embeddings: str = _opt("host", "Input embedding: host (lookup on the CPU; only the rows used reach the GPU) "
                                   "or device.")
    device: str = _opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK).")
    log_every: int = _opt(1, "Log (metrics.jsonl, progress bar) every N steps.")
    report_to: str = _opt("none", "Also log to trackers: none, all, or any of tensorboard (OUTPUT/tensorboard), "
                                  "wandb, mlflow, comma-separated (e.g. wandb,mlflow); their packages must be "
                                  "installed (pip install 'qdora[loggers]'). WANDB_* / MLFLOW_* variables apply.")
    run_name: str = _opt(None, "Run name in wandb / MLflow (default: OUTPUT's folder name).")
    project: str = _opt(None, "wandb project / MLflow experiment (default: qdora).")
    allow_no_export: bool = _opt(False, "Train a family qdora can train and merge but not export to GGUF "
                                        "(a warning instead of the refusal).", flag=True)

    def validate(self) -> TrainConfig:
        """Check every value that can be checked without reading files; raises QdoraError."""
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise QdoraError(f"--{name.replace('_', '-')} is required")
        for name, choice in CHOICES.items():
            choice.check(getattr(self, name))
        parse_target(self.target)
        report_to(self.report_to)
        positive = ("rank", "epochs", "seq_len", "micro_batch", "grad_accum", "log_every")
        for name in positive + ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise QdoraError(f"--{name.replace('_', '-')} must be a positive integer, not {value}")
        if self.eval_split is not None and self.eval_data is None and self.eval_split == self.data_split:
            raise QdoraError(f"--eval-split {self.eval_split} is the training split --data-split: "
                             "choose a held-out split")
        if self.keep < 0:
            raise QdoraError(f"--keep must be >= 0, not {self.keep}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise QdoraError("--lr must be > 0, --weight-decay and --warmup-steps >= 0")
        if self.max_grad_norm < 0 or self.spike_factor < 0:
            raise QdoraError("--max-grad-norm and --spike-factor must be >= 0 (0 turns them off)")
        if 0 < self.spike_factor <= 1:
            raise QdoraError(f"--spike-factor {self.spike_factor} would flag ordinary steps: use a factor > 1")
        if not 0.0 <= self.dropout < 1.0:
            raise QdoraError(f"--dropout must be in [0, 1), not {self.dropout}")
        return self

    @property
    def reporters(self) -> tuple[str, ...]:
        """The trackers --report-to names (none: empty)."""
        return report_to(self.report_to)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    @property
    def offload_params(self) -> bool:
        return offloads_params(self.offload)

    @property
    def offload_activations(self) -> bool:
        return offloads_activations(self.offload)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, resolved: dict[str, Any] | None = None) -> str:
        """The options; `resolved` (what names resolved to: Hub commits) goes under `resolved:`, which
        `read_yaml` skips, so the file can be given back as --config."""
        out = self.to_dict()
        if resolved:
            out[RESOLVED_KEY] = resolved
        return yaml.safe_dump(out, sort_keys=False)


def option_fields() -> list:
    """The dataclass fields, for the CLI to turn into options."""
    return list(fields(TrainConfig))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Options from a YAML mapping; keys may use dashes or underscores; unknown keys are an error."""
    p = Path(path)
    if not p.is_file():
        raise QdoraError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise QdoraError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise QdoraError(f"{path} must hold a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == RESOLVED_KEY:
            continue
        if name not in known:
            raise QdoraError(f"{path}: unknown option {key!r}")
        out[name] = value
    return out


def resolve_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults < config file < flags given on the command line (None means 'not given')."""
    values = {f.name: (f.default if f.default is not MISSING else None) for f in fields(TrainConfig)}
    values.update(file_values)
    values.update({k: v for k, v in flag_values.items() if v is not None})
    types = {f.name: f.type for f in fields(TrainConfig)}
    if isinstance(values.get("report_to"), (list, tuple)):  # YAML: report_to: [wandb, mlflow]
        values["report_to"] = ",".join(map(str, values["report_to"]))
    for name, value in values.items():
        if value is None:
            continue
        try:
            if types[name] == "int":
                values[name] = int(value)
            elif types[name] == "float":
                values[name] = float(value)
            elif types[name] == "bool":
                values[name] = bool(value)
            elif types[name] == "str":
                values[name] = str(value)
        except (TypeError, ValueError) as e:
            raise QdoraError(f"option {name}: {value!r} is not a valid {types[name]}") from e
    return TrainConfig(**values).validate()
