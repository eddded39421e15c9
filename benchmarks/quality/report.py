"""Turn the quality benchmark's results into the markdown section of benchmarks/RESULTS.md.

The section sits between its own markers so that other benchmarks' sections in the same file merge
cleanly and a re-run replaces only this one. The human reading of the numbers lives in
benchmarks/quality/reading.md (committed next to the run it describes) and is pasted in verbatim.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from benchmarks.quality.world import World

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
TITLE = "## Quality: DoRA vs LoRA vs full fine-tuning"
READING = Path(__file__).resolve().parent / "reading.md"


def majority_baseline(world: World) -> dict[str, float]:
    """Exact match of always answering the most common value of the asked attribute among the new
    countries' facts: what a model gets from answer priors alone, without retrieving any fact."""
    common = {a: Counter(f.value for f in world.new if f.attribute == a).most_common(1)[0][0]
              for a in {f.attribute for f in world.new}}
    hits = sum(common[f.attribute] == f.value for f in world.test)
    return {"loss": float("nan"), "token_acc": float("nan"), "exact": hits / len(world.test)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def summarize(results: dict) -> dict[str, dict]:
    """Per method: lists over seeds of every metric, plus trainable count and the picked LR."""
    out: dict[str, dict] = {}
    for r in results["final"]:
        row = out.setdefault(r["method"], {"trainable": r["trainable"], "lr": r["lr"], "runs": []})
        row["runs"].append(r)
    for row in out.values():
        runs = row["runs"]
        row["val_loss"] = [r["val"]["loss"] for r in runs]
        row["test_loss"] = [r["test"]["loss"] for r in runs]
        row["test_exact"] = [r["test"]["exact"] for r in runs]
        row["test_tok"] = [r["test"]["token_acc"] for r in runs]
        row["seen_exact"] = [r["seen"]["exact"] for r in runs]
        row["seconds"] = [r["seconds"] for r in runs]
    return out


def claim_check(rows: dict[str, dict], a: str, b: str) -> str:
    """'a vs b' on test exact match and test loss, with the seed spread as the yardstick."""
    if a not in rows or b not in rows:
        return "n/a"
    (ea, sa), (eb, sb) = mean_std(rows[a]["test_exact"]), mean_std(rows[b]["test_exact"])
    (la, _), (lb, _) = mean_std(rows[a]["test_loss"]), mean_std(rows[b]["test_loss"])
    d = ea - eb
    noise = sa + sb
    if min(len(rows[a]["test_exact"]), len(rows[b]["test_exact"])) < 2:
        verdict = "one seed: no spread to judge it by"
    else:
        verdict = "within seed noise" if abs(d) <= noise else ("higher" if d > 0 else "lower")
    return (f"{a} − {b}: test exact match {d:+.3f} ({verdict}; seed std {sa:.3f} / {sb:.3f}), "
            f"test loss {la - lb:+.3f}")


def markdown_section(results: dict, command: str) -> str:
    cfg, env, base = results["config"], results["environment"], results["base"]
    rows = summarize(results)
    names = list(rows)
    lines = [BEGIN, TITLE, "",
             f"Command: `{command}` — total {results['total_seconds'] / 60:.1f} min.",
             f"Machine: {env['machine']} ({env['platform']}); shared with other jobs, so wall times are indicative.",
             f"Versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"bitsandbytes {env['bitsandbytes']}.", "",
             "**Setup.** A Llama-shaped base (hidden {hidden}, intermediate {intermediate}, {layers} layers, {heads} "
             "heads, vocab {vocab}; {params:,} parameters) is pretrained from scratch in fp32 for {ps} steps "
             "({pt:.0f} s) on profiles of {n_pre} made-up countries (4 facts each, stated in two sentence forms "
             "and asked in an old `Q: … A:` format); afterwards it answers {rec:.1%} of those old-format questions "
             "exactly. The shifted task: {n_new} countries never seen in pretraining, asked in a new "
             "`Ask: <country> / <attribute>?\\nSay:` format. Fine-tuning data (identical for every method): every "
             "fact of the new countries as statements, half of them as new-format questions, and the new format on "
             "{bridge} pretraining facts. The other half of the new facts are held out, split into validation "
             "({nval}) and test ({ntest}) questions, so answering one requires retrieving a fact that training "
             "only *stated*. Every run: {steps} steps, batch {batch}, AdamW, warmup 10% + cosine to 10%, "
             "clip 1.0, fp32. Adapters on all linear layers of the blocks (q,k,v,o,gate,up,down), alpha = 2r, "
             "on the NF4 (double-quantized) base; full fine-tuning trains all parameters of the unquantized base."
             .format(**cfg, vocab=base["vocab"], params=base["params"], ps=cfg["pretrain_steps"],
                     pt=base["pretrain_seconds"], rec=base["old_format_recall"]["exact"],
                     bridge=results["split"]["bridge"], nval=results["split"]["val"],
                     ntest=results["split"]["test"]),
             "",
             "**Metrics.** *Exact match*: every answer token (the value, the full stop and EOS) is the argmax "
             "given the gold prefix — identical to greedy decoding reproducing the answer and stopping. *Answer-"
             "token accuracy*: the fraction of those tokens that are argmax. *Loss*: mean NLL of the answer tokens. "
             "*Seen*: exact match on the new-format questions that were in the fine-tuning set (memorization). "
             f"Learning rate picked per method by validation loss on seed 0; the table is over fresh seeds "
             f"1..{cfg['seeds']} (mean ± sample std).", "",
             "| method | trainable params | LR | val loss | test loss | test exact match | test answer-token acc "
             "| seen exact match | s / run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        r = rows[name]
        lines.append(f"| {name} | {r['trainable']:,} | {r['lr']:g} | {fmt(r['val_loss'])} | {fmt(r['test_loss'])} "
                     f"| {fmt(r['test_exact'])} | {fmt(r['test_tok'])} | {fmt(r['seen_exact'])} "
                     f"| {fmt(r['seconds'], 0)} |")
    for name, m in results["reference"].items():
        loss = "—" if m["loss"] != m["loss"] else f"{m['loss']:.3f}"
        tok = "—" if m["token_acc"] != m["token_acc"] else f"{m['token_acc']:.3f}"
        lines.append(f"| {name} | 0 | — | — | {loss} | {m['exact']:.3f} | {tok} | — | — |")
    all_lrs = sorted({g["lr"] for g in results["grid"]})
    if all_lrs:
        lines += ["", "Learning-rate grid (validation loss, seed 0; picked = lowest, in bold):", "",
                  "| method | " + " | ".join(f"LR {lr:g}" for lr in all_lrs) + " |", "|---|" + "---:|" * len(all_lrs)]
    else:
        lines += ["", "No learning-rate grid in this run (one learning rate per method)."]
    for name in names if all_lrs else []:
        cells = []
        for lr in all_lrs:
            hit = [g for g in results["grid"] if g["method"] == name and g["lr"] == lr]
            if not hit:
                cells.append("")
                continue
            v = f"{hit[0]['val']['loss']:.3f}"
            cells.append(f"**{v}**" if lr == results["picks"][name] else v)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rank = cfg["rank"]
    half = max(1, rank // 2)
    lines += ["", "**Against the DoRA paper's claim** (DoRA ≥ LoRA at equal rank; DoRA at half rank ≈ LoRA):", "",
              f"- {claim_check(rows, f'qdora dora r={rank}', f'qdora lora r={rank}')}",
              f"- {claim_check(rows, f'qdora dora r={half}', f'qdora lora r={rank}')}",
              f"- {claim_check(rows, f'qdora dora r={rank}', 'full fine-tuning')}", ""]
    if results.get("plot"):
        slopes = results.get("slopes", {})
        modules = sorted({m for v in slopes.values() for m in v})
        lines += ["ΔM vs ΔD from `qdora analyze` on the seed-1 weights, against the base each method trained on "
                  "(the NF4 round trip for adapters, the fp32 base for full fine-tuning): one point per layer and "
                  "module. Pearson r(ΔD, ΔM) per module type over the layers (the DoRA paper reads a negative "
                  "slope for full fine-tuning and DoRA, a positive one for LoRA):", "",
                  "| method | " + " | ".join(modules) + " |", "|---|" + "---:|" * len(modules)]
        for name, per in slopes.items():
            lines.append(f"| {name} | " + " | ".join(f"{per.get(m, float('nan')):+.2f}" for m in modules) + " |")
        lines += ["", f"![ΔM vs ΔD per method]({results['plot']})"]
    else:
        lines += ["ΔM vs ΔD plots: not produced — `qdora.tools.analyze` was not on this branch when the run was made. "
                  "The seed-1 weights are saved under `benchmarks/quality/out/full/models/`; "
                  "`python -m benchmarks.quality --from-results` makes the plots without retraining."]
    if READING.exists():
        lines += ["", READING.read_text().strip()]
    lines += [END, ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section in `path` (or append it; create the file if absent)."""
    text = path.read_text() if path.exists() else "# qdora benchmark results\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
