"""The qdora demo: build a tiny base model locally, then train → merge → export → generate, on CPU.

Everything runs through the real `qdora` command line (the same commands a user types), in `demo-out/`:
  1. a tiny Llama-architecture model + tokenizer and a small instruction dataset are written locally;
  2. `qdora train` fine-tunes it with QDoRA (NF4 base, DoRA adapters) and the loss falls;
  3. `qdora merge` writes a full-precision Hugging Face checkpoint;
  4. `qdora export` writes a GGUF and an Ollama Modelfile;
  5. llama.cpp (llama-cpp-python) loads the GGUF and answers a question from the training data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(*args: str) -> None:
    """Run one qdora command as a user would, echoing it; stop the demo on failure."""
    cmd = [sys.executable, "-m", "qdora.cli", *args]
    print("\n$ qdora " + " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"  ({time.time() - t0:.1f} s)", flush=True)


def write_inputs(out: Path) -> tuple[Path, Path]:
    from qdora.testing.demo_data import demo_records
    from qdora.testing.tiny_models import build_tiny_model

    # initializer_range 0.2 (not 0.02): with a frozen random lm_head and small weights the logits stay flat
    # and the tiny model cannot fit even 8 facts; real pretrained bases do not have this problem.
    base = build_tiny_model(out / "base", family="llama", seed=0, hidden_size=128, intermediate_size=256,
                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records(400)))
    return base, data


def show_loss(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if losses:
        picks = losses[:: max(1, len(losses) // 8)] + [losses[-1]]
        print("\nloss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in dict(picks).items()))


def generate(gguf: Path, question: str) -> str:
    from llama_cpp import Llama

    from qdora.data.formats import alpaca_prompt

    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False)
    out = llm(alpaca_prompt(question), max_tokens=16, temperature=0.0)
    return out["choices"][0]["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    base, data = write_inputs(out)
    print(f"tiny base model: {base}   dataset: {data} (alpaca-style, 400 records)")
    run("train", "--model", str(base), "--data", str(data), "--output", str(out / "run"),
        "--method", "dora", "--rank", "16", "--alpha", "32", "--lr", "3e-3", "--max-steps", str(args.steps),
        "--micro-batch", "8", "--seq-len", "128", "--completion-only", "--dtype", "fp32", "--log-every", "10",
        "--save-every", "100", "--seed", "0")
    show_loss(out / "run")
    run("merge", "--adapter", str(out / "run"), "--base-model", str(base), "--output", str(out / "merged"),
        "--dtype", "fp32")
    run("export", "--model", str(out / "merged"), "--output", str(out / "demo.gguf"), "--outtype", "f32",
        "--modelfile")
    question = "What colour is the fox?"
    try:
        answer = generate(out / "demo.gguf", question)
    except ImportError:
        print("\nllama-cpp-python is not installed: skipping generation (scripts/demo.sh installs it)")
        return
    print(f"\nllama.cpp, from {out / 'demo.gguf'}:\n  Q: {question}\n  A: {answer.strip()}")
    print(f"\nOllama: cd {out} && ollama create qdora-demo -f Modelfile && ollama run qdora-demo")


if __name__ == "__main__":
    main()
