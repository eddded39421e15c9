"""The setup phases of `qdora train`, in the order the loop runs them: inputs, data, model, optimizer, resume.

Order matters for bad input: everything that can fail on the user's input (options, model files, config,
targets, NF4 block divisibility, context length, data files, formats, empty data, a checkpoint of another
data layout, another run holding OUTPUT) is checked in `check_inputs` and `setup_data`, *before* OUTPUT is
created, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qdora.core.adapt import AdapterSpec
from qdora.core.adapter_io import fill_adapter
from qdora.core.families import check_family
from qdora.core.frozen_parts import place_frozen_parts
from qdora.core.load import build_meta_model, load_weights, open_checkpoint
from qdora.core.prequantized import base_double_quant
from qdora.data.hub_data import RepoSelect
from qdora.errors import QdoraError
from qdora.io.hub import names_org_repo, resolve_model
from qdora.io.preflight import check_writable
from qdora.options import TORCH_DTYPE_NAMES
from qdora.train.checkpoint import load_checkpoint, resolve_resume
from qdora.train.config import TrainConfig
from qdora.train.distributed import (
    Dist,
    check_mixed_precision,
    enable_gradient_checkpointing,
    load_optimizer_state,
    shard_model,
)
from qdora.train.optim import SpikeGuard, build_optimizer, check_optimizer
from qdora.train.reporters import check_reporters
from qdora.train.rng_state import set_rng_state
from qdora.train.run_lock import LOCK_NAME, check_free
from qdora.train.state import RunState
from qdora.train.step import CausalLMLoss


def _check_output(cfg: TrainConfig) -> Path | None:
    """OUTPUT must be new or empty unless resuming, and no live run may hold it; returns the checkpoint to
    resume from."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise QdoraError(f"--output {out} exists and is not a folder")
    check_writable(out, "the run folder")
    check_free(out)
    if cfg.resume:
        return resolve_resume(out, cfg.resume)
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):  # a stale lock alone is no content
        raise QdoraError(f"--output {out} already holds files: continue it with --resume latest, "
                         "or choose a new folder")
    return None


def _load_tokenizer(cfg: TrainConfig, model_dir: Path):
    """Tokenizer and config exist and fit the options (before anything heavy)."""
    from transformers import AutoConfig, AutoTokenizer

    check_family(model_dir, allow_no_export=cfg.allow_no_export)  # first: before any weight or tokenizer is read
    open_checkpoint(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and cfg.seq_len > context:
        raise QdoraError(f"--seq-len {cfg.seq_len} is longer than the model's context "
                         f"(max_position_embeddings = {context}); use --seq-len {context} or less")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise QdoraError(f"cannot load the tokenizer in {cfg.model}: {e}") from e


def check_inputs(cfg: TrainConfig, d: Dist) -> tuple[RunState, object]:
    """Phase 1: options, output folder, model folder, the adapted model on meta; the run's state and tokenizer."""
    compute = cfg.torch_dtype
    check_mixed_precision(compute, d.sharded)
    check_reporters(cfg.reporters)
    resume_from = _check_output(cfg)
    model = resolve_model(cfg.model, cfg.revision)
    tokenizer = _load_tokenizer(cfg, model.path)
    check_optimizer(cfg.optim, d.device, d.sharded)
    spec = AdapterSpec(method=cfg.method, r=cfg.rank, alpha=cfg.alpha, rslora=cfg.rslora, dropout=cfg.dropout,
                       target=cfg.target, adapter_dtype=TORCH_DTYPE_NAMES[cfg.adapter_dtype],
                       double_quant=base_double_quant(model.path))
    meta, report = build_meta_model(model.path, spec, compute)  # architecture, targets, NF4 block size: refused
    place_frozen_parts(meta, cfg.lm_head, cfg.embeddings, d.device, compute, spec.double_quant)  # before loading
    # adapter_config.json's base_model_name_or_path: a Hub id or a folder's path
    state = RunState(cfg, d, spec, compute, Path(cfg.output), model.path, model.name, resume_from)
    state.model, state.report = meta, report  # still on meta: setup_model shards it and streams the weights in
    state.provenance = {"model": model.record()}
    return state, tokenizer


def _prepare(cfg: TrainConfig, tokenizer, path: str, select: RepoSelect):
    from qdora.data.prepare import prepare_data

    if not Path(path).exists() and not names_org_repo(path):
        raise QdoraError(f"data path {path} does not exist (nor is it a Hub dataset id org/name)")
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise QdoraError(f"data file {path} is empty")
    return prepare_data(path, tokenizer, cfg.seq_len, cfg.format, cfg.completion_only, cfg.packing, select=select)


def _data_selects(cfg: TrainConfig) -> tuple[RepoSelect, tuple[str, RepoSelect] | None]:
    """What --data and the evaluation read: --eval-data (at --eval-split, default train), or --data's
    repository at --eval-split."""
    train = RepoSelect(cfg.data_split, cfg.data_config, cfg.data_revision)
    if cfg.eval_data:
        return train, (cfg.eval_data, RepoSelect(cfg.eval_split or "train"))
    if cfg.eval_split:
        return train, (cfg.data, RepoSelect(cfg.eval_split, cfg.data_config, cfg.data_revision))
    return train, None


def _data_record(path: str, select: RepoSelect, data) -> dict:
    """What a data source resolved to, for train_config.yaml and the adapter's metadata."""
    commits = {c for c in data.stats.revisions.values() if c}
    return {"name": path, "split": select.split, "config": select.config,
            "revision": commits.pop() if len(commits) == 1 else None}


def setup_data(s: RunState, tokenizer) -> None:
    """Phase 2: tokenized data, the number of steps, the batch iterators; a resumed run's saved state is read
    here (and its data position checked) before anything is written."""
    cfg, d = s.cfg, s.dist
    train_select, eval_source = _data_selects(cfg)
    s.data = _prepare(cfg, tokenizer, cfg.data, train_select)
    s.provenance["data"] = _data_record(cfg.data, train_select, s.data)
    steps_per_epoch = max(1, len(s.data.rows) // (cfg.micro_batch * d.world_size))  # 0: the iterator refuses
    if cfg.max_steps:
        s.total_steps = cfg.max_steps
        epochs = max(1, math.ceil(s.total_steps * cfg.grad_accum / steps_per_epoch))
    else:
        epochs = cfg.epochs
        s.total_steps = math.ceil(steps_per_epoch * epochs / cfg.grad_accum)
    s.batches = s.data.batches(cfg.micro_batch, epochs, cfg.seed, True, d.rank, d.world_size)
    s.eval_batches = None
    if eval_source:
        eval_data = _prepare(cfg, tokenizer, *eval_source)
        s.provenance["eval_data"] = _data_record(*eval_source, eval_data)
        s.eval_batches = eval_data.batches(cfg.micro_batch, 1, cfg.seed, False, d.rank, d.world_size)
    s.resumed = None
    if s.resume_from is not None:
        s.resumed = load_checkpoint(s.resume_from, d)
        s.batches.load_state_dict(s.resumed["trainer"]["data"])


def setup_model(s: RunState) -> None:
    """Phase 3: the adapted NF4 model check_inputs built on meta, streamed onto the device (sharded by FSDP2
    first when distributed)."""
    cfg, d = s.cfg, s.dist
    s.wrapper = CausalLMLoss(s.model)
    if d.sharded:
        shard_model(s.wrapper, s.compute, cfg.offload_params, root_blocks=s.model)
    load_weights(s.model, s.model_dir, d.device, cfg.seed)
    if d.device.type == "cuda":  # peak_mem_gb reports training, not the quantization transients of loading
        torch.cuda.reset_peak_memory_stats(d.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(s.model)
    s.wrapper.train()


def setup_optimizer(s: RunState) -> None:
    """Phase 4: AdamW over the adapter, the LR schedule, and a grad scaler for fp16."""
    from transformers import get_scheduler

    cfg = s.cfg
    s.trainable = [p for p in s.model.parameters() if p.requires_grad]
    s.optimizer = build_optimizer(s.trainable, cfg.optim, cfg.lr, cfg.weight_decay, s.dist.device)
    s.spike = SpikeGuard(cfg.spike_factor)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    s.scheduler = get_scheduler(name, s.optimizer, num_warmup_steps=cfg.warmup_steps,
                                num_training_steps=s.total_steps)
    s.scaler = None
    if s.compute == torch.float16:
        if s.dist.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            s.scaler = ShardedGradScaler()
        else:
            s.scaler = torch.amp.GradScaler(s.dist.device.type)


def resume(s: RunState) -> None:
    """Phase 5 (with --resume): adapter, optimizer, schedule, scaler, RNG and step of the checkpoint."""
    saved = s.resumed
    trainer = saved["trainer"]
    fill_adapter(s.model, saved["adapter"], s.resume_from)
    load_optimizer_state(s.model, s.optimizer, saved["optimizer"])
    s.scheduler.load_state_dict(trainer["scheduler"])
    s.spike.load_state_dict(trainer.get("spike") or {})
    if s.scaler is not None and trainer.get("scaler"):
        s.scaler.load_state_dict(trainer["scaler"])
    if saved["rng"] is not None and trainer["world_size"] == s.dist.world_size:
        set_rng_state(saved["rng"])
    s.step = int(trainer["step"])
    s.last_checkpoint = s.resume_from
