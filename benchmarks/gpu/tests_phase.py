"""tests: the `cuda`-marked tests, then the real CLI end to end on a tiny model: train, resume, merge, export.

On the GPU: bf16 training in one process, the same with `--offload params` (FSDP2 on a 1-rank group,
base streamed from pinned host memory) with a checkpoint and a resume from it, `--offload activations`,
then `qdora merge` and `qdora export` (GGUF) of the offloaded run. The dry run does the same on the CPU
without the offload runs (the CPU has nothing to offload to).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu.common import ROOT, Phase

QDORA = [sys.executable, "-m", "qdora.cli"]


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _peak(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((r.get("peak_mem_gb", 0.0) for r in rows), default=None)


def run(phase: Phase) -> None:
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    proc = phase.sh(pytest, timeout=150)
    tail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()][-1:] or ["no output"]
    phase.row("pytest -m cuda", proc.returncode in (0, 5) if phase.dry_run else proc.returncode == 0, None,
              tail[0][:200])

    work = Path(tempfile.mkdtemp(prefix="qdora-gpu-tests-"))  # not under --out: the device returns 8 files
    phase.log(f"work folder {work}")
    model = work / "tiny"
    data = work / "alpaca.jsonl"
    phase.sh([sys.executable, "-c",
              "import sys; from pathlib import Path; from qdora.testing.tiny_models import build_tiny_model; "
              "from qdora.testing.runs import alpaca_data; build_tiny_model(sys.argv[1]); "
              "alpaca_data(Path(sys.argv[2]).parent)", str(model), str(data)],
             timeout=120, check="tiny model and data")
    common = ["--model", str(model), "--data", str(data), "--seq-len", "128", "--rank", "4", "--alpha", "8",
              "--lr", "1e-3", "--dtype", "bf16", "--device", phase.device, "--log-every", "1"]
    runs = {"bf16": []}
    if not phase.dry_run:
        runs["offload-params"] = ["--offload", "params"]
        runs["offload-activations"] = ["--offload", "activations"]
    for name, extra in runs.items():
        out = work / name
        phase.sh(QDORA + ["train", *common, *extra, "--output", str(out), "--max-steps", "4", "--save-every", "2",
                          "--keep", "0"], timeout=90, check=f"qdora train {name} (4 steps)")
        losses = _losses(out)
        phase.data[f"train-{name}"] = dict(losses=losses, peak_mem_gb=_peak(out))
        phase.row(f"{name}: losses finite and logged", len(losses) == 4 and all(v == v for v in losses.values()),
                  None, ", ".join(f"{v:.4f}" for v in losses.values()))
    main_run = work / ("offload-params" if not phase.dry_run else "bf16")
    resumed = work / "resumed"
    phase.sh(QDORA + ["train", *common, *(runs.get("offload-params") or []), "--output", str(resumed),
                      "--max-steps", "4", "--save-every", "2", "--keep", "0", "--resume",
                      str(main_run / "checkpoint-2")], timeout=90, check="qdora train --resume checkpoint-2")
    a, b = _losses(main_run), _losses(resumed)
    tol = 1e-6 if phase.dry_run else 1e-5  # CUDA reductions may differ in the last bits between runs
    same = bool(b) and all(abs(b[s] - a.get(s, float("nan"))) <= tol * abs(a[s]) + 1e-6 for s in b)
    phase.row("resume reproduces steps 3-4", same and sorted(b) == [3, 4], None, f"{a} vs {b}")
    merged = work / "merged"
    phase.sh(QDORA + ["merge", "--adapter", str(main_run), "--output", str(merged), "--base-model", str(model),
                      "--dtype", "bf16"], timeout=90, check="qdora merge")
    phase.sh(QDORA + ["export", "--model", str(merged), "--output", str(work / "model.gguf"), "--outtype", "f16"],
             timeout=90, check="qdora export (GGUF f16)")
    phase.row("GGUF written", (work / "model.gguf").is_file(), None,
              f"{(work / 'model.gguf').stat().st_size} bytes" if (work / "model.gguf").is_file() else "missing")
    phase.data["root"] = str(ROOT)
