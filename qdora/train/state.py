"""The state one training run shares between its phases: setup (`qdora.train.setup`), the step
(`qdora.train.step`), checkpoints (`qdora.train.save`) and the loop (`qdora.train.loop`).

Each field is set once, by the setup phase named beside it (the step counter and the last checkpoint then
move with the loop); reading a field before its phase ran is an AttributeError, not a silent None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdora.core.adapt import AdapterSpec, AdaptReport
from qdora.data.batches import BatchIterator
from qdora.train.config import TrainConfig
from qdora.train.distributed import Dist
from qdora.train.optim import SpikeGuard


@dataclass
class RunState:
    cfg: TrainConfig
    dist: Dist
    spec: AdapterSpec
    compute: torch.dtype  # the compute dtype (adapters and optimizer state stay fp32)
    out: Path
    model_dir: Path  # the base model's local folder (a Hub name resolved to its cache folder)
    base_model: str  # recorded in adapter_config.json: the Hub id, or the folder's path
    resume_from: Path | None  # the checkpoint folder to continue, or None
    # check_inputs, setup_data: what the run read (model and data names, revisions), for train_config.yaml
    # and the adapter's qdora_adapter.json
    provenance: dict[str, Any] = field(init=False)
    # check_inputs builds them on meta (the checks), setup_model shards and loads that same model
    model: nn.Module = field(init=False)  # the causal LM with its adapter layers
    report: AdaptReport = field(init=False)
    # setup_data
    data: Any = field(init=False)  # qdora.data.prepare.PreparedData
    batches: BatchIterator = field(init=False)  # the training micro batches, resumable
    eval_batches: BatchIterator | None = field(init=False)
    total_steps: int = field(init=False)
    resumed: dict[str, Any] | None = field(init=False)  # the checkpoint's saved states, read before loading
    # setup_model
    wrapper: nn.Module = field(init=False)  # CausalLMLoss(model): what the step calls (the FSDP2 root)
    # setup_optimizer
    trainable: list[nn.Parameter] = field(init=False)  # the adapter parameters: optimized and clipped
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)  # torch LR scheduler
    scaler: Any = field(init=False)  # a GradScaler for fp16, else None
    spike: SpikeGuard = field(init=False)  # loss-spike rule and its history (saved in checkpoints)
    # the loop
    step: int = 0
    last_checkpoint: Path | None = None
    # the step: the first step whose loss was non-finite, kept on the device between reported steps
    # (0: none yet); updates from it on are skipped on the device (see qdora.train.step)
    first_nonfinite: torch.Tensor | None = None
