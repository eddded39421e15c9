"""The `qdora` command line: thin click wrappers; the work lives in the modules they call."""

from __future__ import annotations

import logging

import click

from qdora.cli_train import EPILOG, train_options
from qdora.errors import QdoraError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qdora")
def main() -> None:
    """Fine-tune LLMs with QDoRA on a frozen NF4 base, then merge and export for llama.cpp/Ollama."""


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=str),
              help="Merged model folder (safetensors + config.json + tokenizer.json).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="GGUF file to write.")
@click.option("--outtype", default="f16", show_default=True, metavar="f16|bf16|f32|q8_0",
              help="Type of the 2-D weights (norms and biases stay f32).")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile next to the GGUF.")
@click.option("--quantize", multiple=True, metavar="TYPE",
              help="Also quantize with llama.cpp (e.g. Q4_K_M); repeatable. Needs llama-cpp-python.")
def export(model_dir: str, output: str, outtype: str, modelfile: bool, quantize: tuple[str, ...]) -> None:
    """Convert a merged checkpoint to GGUF for llama.cpp / Ollama."""
    from qdora.export import export_gguf

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
        path = export_gguf(model_dir, output, outtype=outtype.lower(), modelfile=modelfile, quantize=quantize)
    except QdoraError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"GGUF ready: {path}")


@main.command(epilog=EPILOG)
@train_options
def train(config_file: str | None, **flags) -> None:
    """Fine-tune a QDoRA/QLoRA adapter on a frozen NF4 base (one process; torchrun for several GPUs).

    Writes OUTPUT/ (final PEFT adapter), OUTPUT/checkpoint-STEP/, OUTPUT/metrics.jsonl and
    OUTPUT/train_config.yaml. Long examples are truncated to --seq-len with a warning; --seq-len above the
    model's context is refused.
    """
    import sys

    from qdora.train import train as run_training
    from qdora.train_config import read_yaml, resolve_config

    logging.basicConfig(level=logging.INFO if _is_main_rank() else logging.ERROR, format="%(message)s")
    for noisy in ("httpx", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = resolve_config(read_yaml(config_file) if config_file else {}, flags)
        result = run_training(cfg)
    except QdoraError as e:
        raise click.ClickException(str(e)) from e
    if result.status == "interrupted":
        click.echo(f"interrupted at step {result.step}: checkpoint {result.checkpoint} written; "
                   f"continue with --resume latest", err=True)
        sys.exit(128 + int(result.signal))
    if _is_main_rank():
        click.echo(f"adapter ready: {result.output} (step {result.step})")


def _is_main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    main()
