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


@main.command()
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(path_type=str),
              help="Adapter folder (adapter_config.json + adapter_model.safetensors, PEFT format).")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder to write the merged Hugging Face model to.")
@click.option("--base-model", default=None, type=click.Path(path_type=str),
              help="Full-precision base model folder [default: the adapter's base_model_name_or_path].")
@click.option("--dtype", default="bf16", show_default=True, metavar="bf16|fp16|fp32", help="Output weight dtype.")
@click.option("--base", "base_kind", default="dequantized", show_default=True,
              type=click.Choice(["dequantized", "original"]),
              help="dequantized: merge onto the NF4 round trip of the base, the weights training saw (untargeted "
                   "block linears are written dequantized too), so the merged model is the trained model. "
                   "original: merge onto the full-precision base; untouched directions keep full precision, but "
                   "it is not the function that was trained (the magnitude was learned against the NF4 norms).")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest output shard (e.g. 500MB, 5GB).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUTPUT folder.")
def merge(adapter_dir: str, output: str, base_model: str | None, dtype: str, base_kind: str, shard_size: str,
          overwrite: bool) -> None:
    """Merge an adapter into its base: a full-precision checkpoint that loads with plain transformers."""
    from qdora.merge import merge_adapter

    try:
        res = merge_adapter(adapter_dir, output, base_model=base_model, dtype=dtype, base=base_kind,
                            shard_size=shard_size, overwrite=overwrite)
    except QdoraError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"merged {res.merged} adapted weights, dequantized {res.dequantized} frozen NF4 weights; "
               f"{res.total_bytes / 1e9:.2f} GB in {res.shards} shard(s) -> {res.output}")


@main.command()
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(path_type=str),
              help="An adapter folder (PEFT format): W' is the adapter merged onto the base.")
@click.option("--finetuned", default=None, type=click.Path(path_type=str),
              help="A fully fine-tuned HF model folder, compared with --base-model directly.")
@click.option("--checkpoints", multiple=True, type=click.Path(path_type=str),
              help="Checkpoint folders of one run (OUTPUT/checkpoint-STEP, each an adapter): the trajectory. "
                   "`--checkpoints run/checkpoint-*` works unquoted.")
@click.option("--base-model", default=None, type=click.Path(path_type=str),
              help="Base model folder [default for adapters: the adapter's base_model_name_or_path].")
@click.option("--base", "base_kind", default=None, type=click.Choice(["dequantized", "original"]),
              help="W to compare against: the NF4 round trip training saw (default for adapters) or the "
                   "full-precision weights (default for --finetuned).")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder for decomposition.csv and decomposition.png.")
@click.argument("more_checkpoints", nargs=-1, type=click.Path(path_type=str))
def analyze(adapter_dir: str | None, finetuned: str | None, checkpoints: tuple[str, ...], base_model: str | None,
            base_kind: str | None, output: str, more_checkpoints: tuple[str, ...]) -> None:
    """Magnitude/direction change of each adapted weight (the DoRA paper's weight-decomposition analysis)."""
    from qdora.analyze import format_table, run_analysis

    try:
        if more_checkpoints and not checkpoints:
            raise QdoraError(f"unexpected arguments {' '.join(more_checkpoints)}")
        rows, summary = run_analysis(output, adapter=adapter_dir, finetuned=finetuned,
                                     checkpoints=[*checkpoints, *more_checkpoints], base_model=base_model,
                                     base=base_kind)
    except QdoraError as e:
        raise click.ClickException(str(e)) from e
    click.echo(format_table(summary))
    click.echo(f"{len(rows)} weights -> {output}/decomposition.csv, {output}/decomposition.png")


if __name__ == "__main__":
    main()
