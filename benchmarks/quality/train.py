"""Pretrain the small base, fine-tune it four ways, and measure held-out answers.

Everything runs in fp32 on CPU. The base is pretrained fully (it is the "pretrained model" a user
would start from); fine-tuning is either full (all parameters, unquantized) or qdora LoRA/DoRA on the
NF4-quantized base, so the adapter methods also pay the quantization error a QLoRA/QDoRA user pays.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.quality.world import Fact, World, finetune_statements, pretrain_documents
from qdora.core.adapt import AdapterSpec, adapt_model

IGNORE = -100


@dataclass
class Example:
    """Token ids and per-token labels (IGNORE where no loss is taken)."""

    ids: list[int]
    labels: list[int]


class Encoder:
    """Turns text and Q/A pairs into Examples with the benchmark's tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def lm(self, text: str) -> Example:
        """A document: loss on every token after BOS."""
        ids = [self.bos] + self.ids(text) + [self.eos]
        return Example(ids, [IGNORE] + ids[1:])

    def qa(self, prompt: str, answer: str, eos: bool = True) -> Example:
        """A question: loss only on the answer tokens and (with `eos`) the closing EOS."""
        p, a = self.ids(prompt), self.ids(answer) + ([self.eos] if eos else [])
        return Example([self.bos] + p + a, [IGNORE] * (1 + len(p)) + a)


def collate(batch: list[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (input_ids, labels, attention_mask)."""
    n = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return ids, labels, mask


def token_losses(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Per-position next-token NLL and argmax correctness, aligned with labels[:, 1:]."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    return nll, logits.argmax(-1) == target, target != IGNORE


def batch_loss(model: nn.Module, batch: list[Example], pad: int) -> torch.Tensor:
    ids, labels, mask = collate(batch, pad)
    nll, _, valid = token_losses(model, ids, labels, mask)
    return (nll * valid).sum() / valid.sum()


@torch.no_grad()
def answer_metrics(model: nn.Module, enc: Encoder, facts: list[Fact], old_format: bool = False,
                   batch_size: int = 64) -> dict[str, float]:
    """Answer-token NLL, answer-token accuracy, and exact match on the (new- or old-format) questions of `facts`.

    Exact match: every answer token (value, full stop, EOS) is the argmax given the gold prefix, which is
    exactly "greedy decoding from the prompt reproduces the answer and then stops". Old-format questions
    only ever appeared inside pretraining profiles, followed by more text, so they are scored without EOS.
    """
    model.eval()
    nll_sum = tok_ok = tok_n = exact = 0.0
    for i in range(0, len(facts), batch_size):
        batch = [enc.qa(*f.old_qa(), eos=False) if old_format else enc.qa(*f.new_qa())
                 for f in facts[i: i + batch_size]]
        ids, labels, mask = collate(batch, enc.pad)
        nll, ok, valid = token_losses(model, ids, labels, mask)
        nll_sum += (nll * valid).sum().item()
        tok_ok += (ok & valid).sum().item()
        tok_n += valid.sum().item()
        exact += ((ok | ~valid).all(dim=1)).sum().item()
    model.train()
    return {"loss": nll_sum / tok_n, "token_acc": tok_ok / tok_n, "exact": exact / len(facts)}


def lr_at(step: int, steps: int, peak: float, warmup_frac: float = 0.1) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    warm = max(1, int(steps * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_loop(model: nn.Module, examples: list[Example], pad: int, steps: int, lr: float, batch_size: int,
               seed: int, weight_decay: float = 0.0, log=None) -> float:
    """AdamW over the trainable parameters, shuffled epochs, gradient clipping at 1. Returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    rng = random.Random(seed)
    order: list[int] = []
    loss = torch.tensor(float("nan"))
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss = batch_loss(model, [examples[i] for i in idx], pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"  step {step + 1}/{steps} loss {loss.item():.3f}")
    return float(loss.detach())


def build_base(vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, seed: int):
    """A Llama-shaped causal LM with random weights (every linear input a multiple of 64 for NF4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=4, pad_token_id=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretrain(model: nn.Module, enc: Encoder, world: World, steps: int, lr: float, batch_size: int,
             seed: int, log=None) -> float:
    """Full fp32 training on country profiles; profiles are re-shuffled each pass so no order is memorized."""
    rng = random.Random(seed)
    docs = [enc.lm(d) for _ in range(8) for d in pretrain_documents(world, rng)]
    return train_loop(model, docs, enc.pad, steps, lr, batch_size, seed, weight_decay=0.01, log=log)


def finetune_examples(enc: Encoder, world: World) -> list[Example]:
    """The shifted task's training set (fixed across methods and seeds): statements about every new
    country (four profiles each, re-drawn), half of their facts asked in the new format, and the new
    format on pretraining countries (so the format can be learned on facts the model already knows)."""
    rng = random.Random(7)
    out = [enc.lm(d) for _ in range(4) for d in finetune_statements(world, rng)]
    out += [enc.qa(*f.new_qa()) for f in world.new_train_qa + world.bridge]
    return out


@dataclass
class MethodSpec:
    """One fine-tuning configuration of the comparison."""

    name: str  # display name
    kind: str  # full | lora | dora
    r: int = 0

    def prepare(self, base: nn.Module, seed: int) -> tuple[nn.Module, int]:
        """A fresh trainable copy of the base: (model, trainable parameter count)."""
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        if self.kind == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            return model, sum(p.numel() for p in model.parameters())
        spec = AdapterSpec(method=self.kind, r=self.r, alpha=2.0 * self.r, adapter_dtype="float32")
        report = adapt_model(model, spec, seed=seed)  # each seed its own initial adapter
        return model, report.trainable_params


@dataclass
class RunResult:
    method: str
    lr: float
    seed: int
    trainable: int
    seconds: float
    val: dict[str, float]
    test: dict[str, float]
    seen: dict[str, float]


def finetune_run(method: MethodSpec, base: nn.Module, enc: Encoder, world: World, examples: list[Example],
                 steps: int, lr: float, seed: int, batch_size: int) -> tuple[RunResult, nn.Module]:
    """Fine-tune one method at one learning rate and seed; evaluate on val, test and seen questions."""
    t0 = time.perf_counter()
    model, trainable = method.prepare(base, seed)
    train_loop(model, examples, enc.pad, steps, lr, batch_size, seed)
    seconds = time.perf_counter() - t0
    result = RunResult(method.name, lr, seed, trainable, seconds, answer_metrics(model, enc, world.val),
                       answer_metrics(model, enc, world.test), answer_metrics(model, enc, world.new_train_qa))
    return result, model
