"""The training loop of `qdora train`: validate, load, (shard), train, checkpoint, resume, report.

Order matters for bad input: everything that can fail on the user's input (options, model files, config,
targets, NF4 block divisibility, context length, data files, formats, empty data) is checked *before*
OUTPUT is created, so a refused run leaves nothing behind.

Loss: the decoder's final hidden states go through `qdora.train.loss.chunked_cross_entropy` with the lm_head
weight (never the full fp32 logits). Averaging is token-weighted over the whole optimizer step: every
micro batch of every rank contributes `loss_sum / N`, N = trained tokens of the step summed over micro
batches and ranks (counted from the labels before the forward). FSDP2 divides gradients by the world size
in its reduce-scatter, so the loss is multiplied by the world size (gloo has no PREMUL_SUM for a custom
divide factor). N ranks × micro_batch m thus train exactly like 1 process × N·m on the same rows.

Stops: SIGINT/SIGTERM finish the current step, write a checkpoint and end with status `interrupted`
(the CLI exits 128+signal). A non-finite loss stops before the optimizer step (the weights stay those of
the last good step; the newest checkpoint is kept). CUDA out of memory becomes one message saying what to
lower.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qdora.core.adapt import AdapterSpec, adapter_layers
from qdora.core.adapter_io import load_adapter_tensors, peft_key, save_adapter
from qdora.core.families import check_family
from qdora.core.load import build_meta_model, fill_param, load_model, open_checkpoint
from qdora.core.prequantized import base_double_quant
from qdora.data.hub_data import RepoSelect
from qdora.errors import QdoraError
from qdora.io.hub import looks_like_repo_id, resolve_model
from qdora.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, set_rng_state
from qdora.train.config import TrainConfig
from qdora.train.distributed import (
    Dist,
    activation_offload,
    autocast,
    check_mixed_precision,
    enable_gradient_checkpointing,
    gather_trainable,
    load_optimizer_state,
    optimizer_state,
    setup_distributed,
    shard_model,
    teardown_distributed,
)
from qdora.train.loss import IGNORE_INDEX, LogitsTransform, chunked_cross_entropy
from qdora.train.metrics import Metrics, peak_memory_gb
from qdora.train.reporters import check_reporters, open_reporters

log = logging.getLogger("qdora.train.loop")
class CausalLMLoss(nn.Module):
    """Decoder → final hidden states → chunked cross-entropy against lm_head: the module FSDP2 wraps at the root.

    Being the root module lets FSDP2 gather the root parameters (embeddings, final norm, lm_head) in its
    forward, although the lm_head module itself is never called (only its weight is used).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.transform = LogitsTransform.from_config(lm.config)  # e.g. Gemma 2's final soft-capping

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.model(input_ids=input_ids, use_cache=False, **kw).last_hidden_state
        return chunked_cross_entropy(hidden, self.lm.lm_head.weight, labels, transform=self.transform)


@dataclass
class TrainResult:
    """What a run did: for the CLI's last line and for tests (the model is the in-memory trained one)."""

    output: Path
    step: int
    status: str  # done | interrupted
    losses: dict[int, float] = field(default_factory=dict)
    model: nn.Module | None = None
    checkpoint: Path | None = None
    signal: int | None = None


class _Stop:
    """SIGINT/SIGTERM → a flag the loop checks after each step (installed only in the main thread).

    A second signal raises KeyboardInterrupt at once (no checkpoint) for a user who cannot wait.
    """

    def __init__(self):
        self.signum: int | None = None

    @contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signum is not None:  # a second signal: stop now, without the checkpoint
                raise KeyboardInterrupt
            self.signum = signum

        for s in old:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _check_output(cfg: TrainConfig) -> Path | None:
    """OUTPUT must be new or empty unless resuming; returns the checkpoint to resume from."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise QdoraError(f"--output {out} exists and is not a folder")
    if cfg.resume:
        return resolve_resume(out, cfg.resume)
    if out.is_dir() and any(out.iterdir()):
        raise QdoraError(f"--output {out} already holds files: continue it with --resume latest, "
                         "or choose a new folder")
    return None


def _check_model_dir(cfg: TrainConfig, model_dir: Path):
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
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise QdoraError(f"cannot load the tokenizer in {cfg.model}: {e}") from e
    return tok


def _prepare(cfg: TrainConfig, tok, path: str, select: RepoSelect):
    from qdora.data.prepare import prepare_data

    if not Path(path).exists() and not ("/" in path and looks_like_repo_id(path)):
        raise QdoraError(f"data path {path} does not exist (nor is it a Hub dataset id org/name)")
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise QdoraError(f"data file {path} is empty")
    return prepare_data(path, tok, cfg.seq_len, cfg.format, cfg.completion_only, cfg.packing, select=select)


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


def _schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def _peft_state(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainable parameter names (`model.layers.0.self_attn.q_proj.lora_A`) → PEFT adapter keys."""
    out = {}
    for name, t in trainable.items():
        path, _, attr = name.rpartition(".")
        out[peft_key(path, attr)] = t.contiguous()
    return out


def _load_adapter_into(lm: nn.Module, adapter_dir: Path) -> None:
    layers = adapter_layers(lm)
    for (path, attr), tensor in load_adapter_tensors(adapter_dir).items():
        if path not in layers or getattr(layers[path], attr, None) is None:
            raise QdoraError(f"checkpoint {adapter_dir} does not fit this model ({path}.{attr})")
        fill_param(getattr(layers[path], attr), tensor)


def _count_tokens(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(trained tokens, as the loss counts them after the causal shift; input tokens, padding excluded)."""
    trained = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batches)
    inputs = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in batches)
    return trained, inputs


def evaluate(wrapper: nn.Module, data, cfg: TrainConfig, d: Dist, compute: torch.dtype) -> float:
    """Token-weighted mean loss over the eval rows (every rank its slice; the tail of a global batch dropped)."""
    wrapper.eval()
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    with torch.no_grad():
        for batch in data.batches(cfg.micro_batch, 1, cfg.seed, False, d.rank, d.world_size):
            batch = {k: v.to(d.device) for k, v in batch.items()}
            with autocast(d.device, compute, d.sharded):
                loss_sum, count = wrapper(**batch)
            total += torch.stack([loss_sum.double(), count.double()])
    d.all_reduce_sum(total)
    wrapper.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train(cfg: TrainConfig) -> TrainResult:
    """Run `qdora train` with a resolved config (see `qdora.train.config`). Raises QdoraError on bad input."""
    cfg.validate()
    d = setup_distributed(cfg.device, cfg.offload_params)
    try:
        with ExitStack() as stack:
            return _run(cfg, d, stack)
    except torch.OutOfMemoryError as e:
        raise QdoraError(
            f"CUDA out of memory ({e.__class__.__name__}): lower --micro-batch (now {cfg.micro_batch}) or "
            f"--seq-len (now {cfg.seq_len}), or offload (--offload activations, params or all; now "
            f"{cfg.offload}); more --grad-accum keeps the global batch"
        ) from e
    finally:
        teardown_distributed(d)


def _run(cfg: TrainConfig, d: Dist, stack: ExitStack) -> TrainResult:
    compute = cfg.torch_dtype
    check_mixed_precision(compute, d.sharded)
    check_reporters(cfg.reporters)
    resume_from = _check_output(cfg)
    model = resolve_model(cfg.model, cfg.revision)
    tok = _check_model_dir(cfg, model.path)
    spec = AdapterSpec(method=cfg.method, r=cfg.rank, alpha=cfg.alpha, rslora=cfg.rslora, dropout=cfg.dropout,
                       target=cfg.target, adapter_dtype="float32", double_quant=base_double_quant(model.path))
    build_meta_model(model.path, spec, compute)  # architecture, targets, NF4 block size: refused before loading
    train_select, eval_source = _data_selects(cfg)
    data = _prepare(cfg, tok, cfg.data, train_select)
    eval_data = _prepare(cfg, tok, *eval_source) if eval_source else None
    provenance = {"model": model.record(), "data": _data_record(cfg.data, train_select, data)}
    if eval_source:
        provenance["eval_data"] = _data_record(*eval_source, eval_data)
    probe = data.batches(cfg.micro_batch, 1, cfg.seed, True, d.rank, d.world_size)
    if eval_data is not None:
        eval_data.batches(cfg.micro_batch, 1, cfg.seed, False, d.rank, d.world_size)
    if cfg.max_steps:
        total_steps = cfg.max_steps
        epochs = max(1, math.ceil(total_steps * cfg.grad_accum / probe.steps_per_epoch))
    else:
        epochs = cfg.epochs
        total_steps = math.ceil(probe.steps_per_epoch * epochs / cfg.grad_accum)
    iterator = data.batches(cfg.micro_batch, epochs, cfg.seed, True, d.rank, d.world_size)
    state = None
    if resume_from is not None:  # refuse a checkpoint of another data layout before anything is written
        state = load_checkpoint(resume_from, d)
        iterator.load_state_dict(state["trainer"]["data"])

    holder: dict[str, nn.Module] = {}

    def shard(lm: nn.Module) -> None:
        holder["wrapper"] = CausalLMLoss(lm)
        shard_model(holder["wrapper"], compute, cfg.offload_params, root_blocks=lm)

    lm, report = load_model(model.path, spec, d.device, compute, cfg.seed, shard=shard if d.sharded else None)
    wrapper = holder.get("wrapper") or CausalLMLoss(lm)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    wrapper.train()

    out = Path(cfg.output)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(cfg.to_yaml(resolved=provenance))
    d.barrier()

    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _schedule(cfg, optimizer, total_steps)
    scaler = None
    if compute == torch.float16:
        if d.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler()
        else:
            scaler = torch.amp.GradScaler(d.device.type)
    torch.manual_seed(cfg.seed + d.rank)  # dropout masks

    step = 0
    last_ckpt = None
    if state is not None:
        _load_adapter_into(lm, resume_from)
        load_optimizer_state(lm, optimizer, state["optimizer"], d.sharded)
        scheduler.load_state_dict(state["trainer"]["scheduler"])
        if scaler is not None and state["trainer"].get("scaler"):
            scaler.load_state_dict(state["trainer"]["scaler"])
        if state["rng"] is not None and state["trainer"]["world_size"] == d.world_size:
            set_rng_state(state["rng"])
        step = int(state["trainer"]["step"])
        last_ckpt = resume_from
    reporters = open_reporters(cfg.reporters, out, {**cfg.to_dict(), "resolved": provenance}, cfg.run_name,
                               cfg.project) if d.main else []
    metrics = stack.enter_context(Metrics(out, d.main, total_steps, step, reporters))  # failed if _run raises
    if d.main:
        metrics.write(f"qdora: {report.summary()}")
        metrics.write(f"qdora: {data.stats.rows} rows, {data.stats.trained_tokens} trained tokens; "
                      f"{total_steps} steps of {cfg.micro_batch}×{cfg.grad_accum}×{d.world_size} rows"
                      + (f"; resumed from {resume_from} at step {step}" if resume_from else ""))

    def checkpoint() -> Path:
        trainable = gather_trainable(lm)
        optim = optimizer_state(lm, optimizer, d.sharded)
        trainer_state = {"scheduler": scheduler.state_dict(), "data": iterator.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "config": cfg.to_dict()}
        return save_checkpoint(out, step, d, spec, _peft_state(trainable), optim, trainer_state, base_model,
                               cfg.keep, provenance)

    base_model = model.name  # adapter_config.json's base_model_name_or_path: a Hub id or a folder's path
    result = TrainResult(out, step, "done")
    batches_it = iter(iterator)
    stop = _Stop()
    window_tokens, window_start = 0, time.perf_counter()
    with stop.installed():
        while step < total_steps:
            batches = []
            for _ in range(cfg.grad_accum):
                b = next(batches_it, None)
                if b is None:
                    break
                batches.append({k: v.to(d.device) for k, v in b.items()})
            if not batches:
                break
            trained, inputs = _count_tokens(batches)
            counts = d.all_reduce_sum(torch.tensor([trained, inputs], dtype=torch.float64, device=d.device))
            n_global = counts[0].clamp(min=1)
            loss_total = torch.zeros((), dtype=torch.float64, device=d.device)
            for i, batch in enumerate(batches):
                if d.sharded:
                    wrapper.set_requires_gradient_sync(i == len(batches) - 1)
                with activation_offload(cfg.offload_activations, d.device), \
                        autocast(d.device, compute, d.sharded):
                    loss_sum, _ = wrapper(**batch)
                scaled = loss_sum * (d.world_size / n_global.to(loss_sum.dtype))
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_total += loss_sum.detach().double()
            loss = (d.all_reduce_sum(loss_total) / n_global).item()
            if not math.isfinite(loss):
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else \
                    "no checkpoint was written yet (use --save-every)"
                raise QdoraError(f"the loss became {loss} at step {step + 1}: training stopped before that "
                                 f"update; {where}. Try a lower --lr (now {cfg.lr}) or --dtype bf16/fp32")
            lr = scheduler.get_last_lr()[0]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.losses[step] = loss
            window_tokens += int(counts[1].item())
            row = None
            if eval_data is not None and (cfg.eval_every and step % cfg.eval_every == 0 or step == total_steps):
                row = {"step": step, "eval_loss": evaluate(wrapper, eval_data, cfg, d, compute)}
            if step % cfg.log_every == 0 or step == total_steps or row is not None:
                now = time.perf_counter()
                row = {"step": step, "loss": loss, "lr": lr,
                       "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                       "peak_mem_gb": peak_memory_gb(d.device), "epoch": iterator.epoch, **(row or {})}
                metrics.log(row)
                window_tokens, window_start = 0, now
            metrics.advance()
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                last_ckpt = checkpoint()
            if d.any(stop.signum is not None):
                last_ckpt = checkpoint()
                result.status, result.signal = "interrupted", stop.signum or signal.SIGTERM
                break
    metrics.close("interrupted" if result.status == "interrupted" else "done")
    result.step, result.checkpoint = step, last_ckpt
    if result.status == "done":
        trainable = gather_trainable(lm)
        if d.main:
            save_adapter(None, out, spec, base_model=base_model, state=_peft_state(trainable), provenance=provenance)
        d.barrier()
    result.model = lm
    return result
