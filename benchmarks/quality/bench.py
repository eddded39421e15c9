"""Quality benchmark: does QDoRA learn a shifted task better than QLoRA, and how close to full fine-tuning?

    python -m benchmarks.quality [--seeds 3] [--steps N] [--quick]

Pretrains a small Llama-shaped base on a generated world (benchmarks/quality/world.py), then fine-tunes
it on held-out countries asked in a new format with (a) full fine-tuning, (b) qdora LoRA r, (c) qdora
DoRA r, (d) qdora DoRA r/2. Learning rates are picked per method on a grid by validation loss (seed 0);
the picks are then run on fresh seeds and scored on a separate test split. Full mode writes the
"Quality" section of benchmarks/RESULTS.md; --quick is a ~1-minute smoke run that writes only under
the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.quality.analysis import analyze_weights, side_by_side
from benchmarks.quality.report import majority_baseline, markdown_section, write_section
from benchmarks.quality.train import (
    Encoder,
    MethodSpec,
    RunResult,
    answer_metrics,
    build_base,
    finetune_examples,
    finetune_run,
    pretrain,
)
from benchmarks.quality.world import make_world, tokenizer_corpus

HERE = Path(__file__).resolve().parent


@dataclass
class Config:
    """Every size and budget of one benchmark run (recorded with the results)."""

    hidden: int = 256
    intermediate: int = 512
    layers: int = 4
    heads: int = 4
    vocab_target: int = 512
    n_pre: int = 240
    n_new: int = 96
    pretrain_steps: int = 500
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 32
    steps: int = 150
    batch: int = 32
    rank: int = 8
    seeds: int = 3
    grid: dict[str, list[float]] = field(default_factory=lambda: {
        "full": [1e-4, 3e-4, 1e-3], "lora": [3e-3, 1e-2, 3e-2], "dora": [3e-3, 1e-2, 3e-2]})

    @classmethod
    def quick(cls) -> Config:
        return cls(hidden=64, intermediate=128, layers=2, n_pre=80, n_new=32, pretrain_steps=80,
                   pretrain_lr=3e-3, pretrain_batch=16, steps=50, batch=16, rank=8, seeds=1,
                   grid={"full": [1e-3], "lora": [1e-2], "dora": [1e-2]})  # no grid: one run per method

    def methods(self) -> list[MethodSpec]:
        half = max(1, self.rank // 2)
        return [MethodSpec("full fine-tuning", "full"), MethodSpec(f"qdora lora r={self.rank}", "lora", self.rank),
                MethodSpec(f"qdora dora r={self.rank}", "dora", self.rank),
                MethodSpec(f"qdora dora r={half}", "dora", half)]


def make_base(cfg: Config, out: Path, log, reuse: bool = False) -> tuple[torch.nn.Module, Encoder, object, dict]:
    """Build the world and tokenizer, pretrain the base (fp32, full) and save it as a HF model folder
    (with `reuse`, load the base an earlier run of the same config saved instead of pretraining again)."""
    from qdora.testing.tiny_tokenizers import build_bpe_tokenizer

    world = make_world(cfg.n_pre, cfg.n_new)
    info_path = out / "base" / "pretrain_info.json"
    if reuse and info_path.exists():
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(out / "base")
        enc = Encoder(tok)
        base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        info = json.loads(info_path.read_text())
        info["old_format_recall"] = answer_metrics(base, enc, world.pre, old_format=True)
        info["reused"] = True
        log(f"reused the pretrained base in {out / 'base'}: recall {info['old_format_recall']['exact']:.3f}")
        return base, enc, world, info
    tok = build_bpe_tokenizer(cfg.vocab_target, tokenizer_corpus(world))
    enc = Encoder(tok)
    vocab = (len(tok) + 63) // 64 * 64
    base = build_base(vocab, cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, seed=0)
    t0 = time.perf_counter()
    loss = pretrain(base, enc, world, cfg.pretrain_steps, cfg.pretrain_lr, cfg.pretrain_batch, seed=0, log=log)
    info = {"pretrain_seconds": time.perf_counter() - t0, "pretrain_final_loss": loss,
            "params": sum(p.numel() for p in base.parameters()), "vocab": vocab,
            "old_format_recall": answer_metrics(base, enc, world.pre, old_format=True)}
    log(f"pretrained {info['params']:,} params in {info['pretrain_seconds']:.0f}s, loss {loss:.3f}, "
        f"old-format recall of pretraining facts {info['old_format_recall']['exact']:.3f}")
    base.save_pretrained(out / "base", safe_serialization=True)
    tok.save_pretrained(out / "base")
    info_path.write_text(json.dumps(info, indent=1))
    return base, enc, world, info


def grid_from_log(path: Path) -> list[dict]:
    """Grid results from the `grid …` lines of an earlier run's log (method, lr, validation loss/exact)."""
    rows = []
    for m in re.finditer(r"^grid  (.+?)\s+lr=([0-9.e-]+): val loss ([0-9.]+) exact ([0-9.]+)$", path.read_text(),
                         re.MULTILINE):
        rows.append({"method": m[1].strip(), "lr": float(m[2]), "seed": 0,
                     "val": {"loss": float(m[3]), "exact": float(m[4])}, "from_log": str(path.name)})
    return rows


def untuned_rows(base, enc: Encoder, world) -> dict[str, dict[str, float]]:
    """Reference rows: the base as pretrained, the same base after NF4 quantization, and answer priors."""
    from benchmarks.quality.train import MethodSpec as M

    nf4, _ = M("nf4", "lora", 1).prepare(base, 0)  # B = 0: exactly the NF4-quantized base
    return {"base (untuned, fp32)": answer_metrics(base, enc, world.test),
            "base (untuned, NF4)": answer_metrics(nf4, enc, world.test),
            "majority answer per attribute": majority_baseline(world)}


def model_dir(out: Path, method_name: str) -> Path:
    return out / "models" / method_name.replace(" ", "_").replace("=", "")


def save_for_analysis(method: MethodSpec, model, out: Path, base_dir: Path) -> Path:
    """Save the fine-tuned weights where `qdora analyze` can read them (adapter or full model folder)."""
    target = model_dir(out, method.name)
    if method.kind == "full":
        model.save_pretrained(target, safe_serialization=True)
    else:
        from qdora.core.adapt import AdapterSpec
        from qdora.core.adapter_io import save_adapter

        spec = AdapterSpec(method=method.kind, r=method.r, alpha=2.0 * method.r, adapter_dtype="float32")
        save_adapter(model, target, spec, base_model=str(base_dir))
    return target


def run(cfg: Config, out: Path, log=print, reuse_base: bool = False, logged_grid: list[dict] | None = None) -> dict:
    """The whole benchmark; returns everything the report needs (also written to out/results.json).
    `logged_grid`: take the learning-rate grid's results from an earlier run's log instead of re-running it."""
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base, enc, world, info = make_base(cfg, out, log, reuse_base)
    examples = finetune_examples(enc, world)
    reference = untuned_rows(base, enc, world)
    grid_results: list[RunResult] = []
    final: list[RunResult] = []
    picks: dict[str, float] = {}
    saved: dict[str, str] = {}
    for method in cfg.methods():
        lrs = cfg.grid["full" if method.kind == "full" else method.kind]
        tried = [] if logged_grid is None else [SimpleNamespace(**g) for g in logged_grid if g["method"] == method.name]
        for lr in lrs if len(lrs) > 1 and logged_grid is None else []:  # a one-value grid needs no tuning run
            res, _ = finetune_run(method, base, enc, world, examples, cfg.steps, lr, 0, cfg.batch)
            log(f"grid  {method.name:22s} lr={lr:g}: val loss {res.val['loss']:.3f} exact {res.val['exact']:.3f}")
            tried.append(res)
        grid_results += tried
        picks[method.name] = min(tried, key=lambda r: r.val["loss"]).lr if tried else lrs[0]
        for seed in range(1, cfg.seeds + 1):
            res, model = finetune_run(method, base, enc, world, examples, cfg.steps, picks[method.name], seed,
                                      cfg.batch)
            log(f"final {method.name:22s} seed {seed}: test exact {res.test['exact']:.3f} "
                f"loss {res.test['loss']:.3f} ({res.seconds:.0f}s)")
            final.append(res)
            checkpoint = {"picks": picks, "final": [asdict(r) for r in final], "grid": [
                vars(r) if isinstance(r, SimpleNamespace) else asdict(r) for r in grid_results]}
            (out / "partial.json").write_text(json.dumps(checkpoint, indent=1))  # a crash loses no finished run
            if seed == 1:
                saved[method.name] = str(save_for_analysis(method, model, out, out / "base"))
    split = {"bridge": len(world.bridge), "train_qa": len(world.new_train_qa), "val": len(world.val),
             "test": len(world.test), "examples": len(examples)}
    results = {"config": asdict(cfg), "base": info, "split": split, "reference": reference, "picks": picks,
               "grid": [vars(r) if isinstance(r, SimpleNamespace) else asdict(r) for r in grid_results],
               "final": [asdict(r) for r in final],
               "saved": saved, "total_seconds": time.perf_counter() - t_start, "environment": environment()}
    add_plots(results, out)
    return results


def add_plots(results: dict, out: Path) -> None:
    """`qdora analyze` on each method's seed-1 weights, one side-by-side figure of all methods, and the
    per-module slopes; rewrites results.json."""
    saved_dirs = results.get("saved") or {r["method"]: str(model_dir(out, r["method"])) for r in results["final"]}
    csvs, slopes = {}, {}
    for name, saved in saved_dirs.items():
        kw = {"finetuned_dir": Path(saved)} if name == "full fine-tuning" else {"adapter_dir": Path(saved)}
        csvs[name], slopes[name] = analyze_weights(out / "base", out / "analysis" / Path(saved).name, **kw)
    plot = side_by_side(csvs, out / "plots" / "dm_vs_dd.png")
    results["plot"] = os.path.relpath(plot, HERE)
    results["slopes"] = slopes
    (out / "results.json").write_text(json.dumps(results, indent=1))


def environment() -> dict[str, str]:
    import bitsandbytes
    import transformers

    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__, "platform": platform.platform(),
            "machine": f"{cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, no GPU"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None, help="fresh seeds per method after tuning (default 3)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default 150)")
    p.add_argument("--quick", action="store_true", help="~1-minute smoke run; does not touch RESULTS.md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a shared machine: spinning OpenMP threads collide)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/quality/out[/quick])")
    p.add_argument("--from-results", action="store_true",
                   help="do not train: redo the plots and the report from <out>/results.json")
    p.add_argument("--reuse-base", action="store_true", help="load <out>/base from an earlier run, skip pretraining")
    p.add_argument("--grid-from-log", type=Path, default=None,
                   help="take the LR grid's results from an earlier run's log instead of re-running the grid")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown file for the full run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config.quick() if args.quick else Config()
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.steps is not None:
        cfg.steps = args.steps
    out = args.out or (HERE / "out" / ("quick" if args.quick else "full"))
    if args.from_results:  # plots and report from a finished run (e.g. once qdora.tools.analyze has landed)
        results = json.loads((out / "results.json").read_text())
        add_plots(results, out)
    else:
        logged = grid_from_log(args.grid_from_log) if args.grid_from_log else None
        results = run(cfg, out, log=lambda s: print(s, flush=True), reuse_base=args.reuse_base, logged_grid=logged)
        given = sys.argv[1:] if argv is None else argv
        results["command"] = " ".join(["python -m benchmarks.quality", *given])
        (out / "results.json").write_text(json.dumps(results, indent=1))
    section = markdown_section(results, results.get("command", "python -m benchmarks.quality"))
    (out / "section.md").write_text(section)
    print(section)
    if not args.quick:
        write_section(args.results, section)
    return 0
