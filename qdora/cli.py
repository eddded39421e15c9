"""The `qdora` command line: thin click wrappers; the work lives in the modules they call."""

from __future__ import annotations

import logging

import click

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


if __name__ == "__main__":
    main()
