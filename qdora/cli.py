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
@click.option("--model", required=True, help="model folder (config.json), a config.json file, or a preset "
              "(llama-3-70b, llama-3-8b, llama-3.2-1b)")
@click.option("--gpus", type=int, default=1, show_default=True, help="ranks sharing the model with FSDP2")
@click.option("--gpu-mem", type=float, default=24.0, show_default=True, help="memory per GPU in GiB")
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--rank", type=int, default=16, show_default=True)
@click.option("--micro-batch", type=int, default=1, show_default=True)
@click.option("--method", type=click.Choice(["dora", "lora"]), default="dora", show_default=True)
@click.option("--offload", type=click.Choice(["none", "activations", "params", "all"]), default="none",
              show_default=True)
@click.option("--target", default="all-linear", show_default=True, help="all-linear or q_proj,v_proj,...")
@click.option("--loss", type=click.Choice(["chunked", "full"]), default="chunked", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan(model, gpus, gpu_mem, seq_len, rank, micro_batch, method, offload, target, loss, as_json) -> None:
    """Per-GPU memory of a QDoRA run, whether it fits, and the cheapest settings that make it fit.

    Exit status 0 when it fits, 1 when it does not (the report then names the settings that would fit).
    """
    import json

    from qdora.plan import load_config, plan_memory

    try:
        result = plan_memory(load_config(model), gpus=gpus, gpu_mem_gib=gpu_mem, seq_len=seq_len, rank=rank,
                             micro_batch=micro_batch, method=method, offload=offload, target=target, loss=loss)
    except QdoraError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.report())
    if not result.fits:
        raise SystemExit(1)


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
