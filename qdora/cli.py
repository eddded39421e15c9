"""The `qdora` command line: thin click wrappers; the work lives in the modules they call."""

from __future__ import annotations

import logging

import click

from qdora.cli_errors import QdoraGroup
from qdora.cli_options import EPILOG, train_options
from qdora.errors import QdoraError
from qdora.options import BASE, DTYPE, EMBEDDINGS, LM_HEAD, LOSS, METHOD, OFFLOAD, OPTIM, TRAIN_ADAPTER_DTYPE


@click.group(cls=QdoraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qdora")
def main() -> None:
    """Fine-tune LLMs with QDoRA on a frozen NF4 base, then merge and export for llama.cpp/Ollama."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A `qdora train` YAML: its model, revision, seq-len, rank, micro-batch, method, offload and "
                   "target are planned (flags given here override them).")
@click.option("--model", default=None, help="model folder (config.json), a config.json file, a preset "
              "(llama-3-70b, llama-3-8b, llama-3.2-1b, qwen2.5-7b, mistral-7b), or a Hub id org/name "
              "(fetches config.json only)")
@click.option("--revision", default=None, help="Hub branch, tag or commit of --model [default: main]")
@click.option("--gpus", type=int, default=1, show_default=True, help="ranks sharing the model with FSDP2")
@click.option("--gpu-mem", type=float, default=24.0, show_default=True, help="memory per GPU in GiB")
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--rank", type=int, default=16, show_default=True)
@click.option("--micro-batch", type=int, default=1, show_default=True)
@click.option("--method", default="dora", show_default=True, metavar=METHOD.metavar)
@click.option("--offload", default="none", show_default=True, metavar=OFFLOAD.metavar)
@click.option("--target", default="all-linear", show_default=True,
              help="all-linear, names (q_proj,v_proj), or a regex on module paths (as qdora train)")
@click.option("--loss", default="chunked", show_default=True, metavar=LOSS.metavar)
@click.option("--lm-head", default="dense", show_default=True, metavar=LM_HEAD.metavar)
@click.option("--embeddings", default="host", show_default=True, metavar=EMBEDDINGS.metavar)
@click.option("--adapter-dtype", default="fp32", show_default=True, metavar=TRAIN_ADAPTER_DTYPE.metavar)
@click.option("--optim", default="adamw", show_default=True, metavar=OPTIM.metavar)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@click.option("--allow-no-export", is_flag=True, help="plan a family qdora trains but cannot export to GGUF")
@click.pass_context
def plan(ctx, config_file, model, revision, gpus, gpu_mem, seq_len, rank, micro_batch, method, offload, target, loss,
         lm_head, embeddings, adapter_dtype, optim, as_json, allow_no_export) -> None:
    """Per-GPU memory of a QDoRA run, whether it fits, and the cheapest settings that make it fit.

    Exit status 0 when it fits, 1 when it does not (the report then names the settings that would fit).
    """
    import json

    from qdora.core.families import check_family
    from qdora.tools.plan import load_config, plan_memory, train_settings

    if config_file:
        given = {k for k in ctx.params if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
        values = {k: v for k, v in train_settings(config_file).items() if k not in given}
        model, revision = values.get("model", model), values.get("revision", revision)
        seq_len, rank = values.get("seq_len", seq_len), values.get("rank", rank)
        micro_batch, method = values.get("micro_batch", micro_batch), values.get("method", method)
        offload, target = values.get("offload", offload), values.get("target", target)
    if not model:
        raise QdoraError("qdora plan needs --model (or --config with a model)")

    config = load_config(model, revision)
    if isinstance(config, dict):  # a model's config.json (presets are Llama shapes)
        check_family(config, ("train", "export"), allow_no_export, command="qdora plan")
    result = plan_memory(config, gpus=gpus, gpu_mem_gib=gpu_mem, seq_len=seq_len, rank=rank,
                         micro_batch=micro_batch, method=method, offload=offload, target=target, loss=loss,
                         lm_head=lm_head, embeddings=embeddings, adapter_dtype=adapter_dtype, optim=optim)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.report())
    if not result.fits:
        raise SystemExit(1)


@main.command()
@click.option("--model", "model_dir", default=None, type=click.Path(path_type=str),
              help="Merged model folder (safetensors + config.json + tokenizer.json).")
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(path_type=str),
              help="Or an adapter folder: merged onto its base on the way, one tensor at a time, without "
                   "writing the merged checkpoint (same file as `qdora merge` then `qdora export --model`).")
@click.option("--base-model", default=None, type=click.Path(path_type=str),
              help="With --adapter: full-precision base, a folder or a Hub id [default: the adapter's "
                   "base_model_name_or_path].")
@click.option("--revision", default=None, help="With --adapter: Hub branch, tag or commit of --base-model.")
@click.option("--base", "base_kind", default="dequantized", show_default=True, metavar=BASE.metavar,
              help="With --adapter: as `qdora merge --base`.")
@click.option("--dtype", default="bf16", show_default=True, metavar=DTYPE.metavar,
              help="With --adapter: as `qdora merge --dtype` (the merged weights are rounded to it first).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="GGUF file to write.")
@click.option("--outtype", default="f16", show_default=True, metavar="f16|bf16|f32|q8_0",
              help="Type of the 2-D weights (norms and biases stay f32).")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile next to the GGUF.")
@click.option("--quantize", multiple=True, metavar="TYPE",
              help="Also quantize with llama.cpp (e.g. Q4_K_M); repeatable. Needs llama-cpp-python.")
def export(model_dir: str | None, adapter_dir: str | None, base_model: str | None, revision: str | None,
           base_kind: str, dtype: str, output: str, outtype: str, modelfile: bool, quantize: tuple[str, ...]) -> None:
    """Convert a merged checkpoint, or an adapter and its base in one step, to GGUF for llama.cpp / Ollama."""
    from qdora.export.adapter_gguf import export_adapter_gguf
    from qdora.export.gguf_export import export_gguf

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    if (model_dir is None) == (adapter_dir is None):
        raise QdoraError("give exactly one of --model (a merged model folder) or --adapter (an adapter folder)")
    common = {"outtype": outtype.lower(), "modelfile": modelfile, "quantize": quantize}
    if adapter_dir is not None:
        path = export_adapter_gguf(adapter_dir, output, base_model=base_model, base=base_kind, dtype=dtype,
                                   revision=revision, **common)
    else:
        if base_model is not None or revision is not None:
            raise QdoraError("--base-model and --revision go with --adapter; --model is already a merged model")
        path = export_gguf(model_dir, output, **common)
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

    from qdora.train.config import read_yaml, resolve_config
    from qdora.train.loop import train as run_training

    logging.basicConfig(level=logging.INFO if _is_main_rank() else logging.ERROR, format="%(message)s")
    for noisy in ("httpx", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = resolve_config(read_yaml(config_file) if config_file else {}, flags)
    result = run_training(cfg)
    if result.status == "interrupted":
        if _is_main_rank():
            click.echo(f"interrupted at step {result.step}: checkpoint {result.checkpoint} written; "
                       f"continue with --resume latest", err=True)
        sys.exit(128 + int(result.signal))
    if _is_main_rank():
        click.echo(f"adapter ready: {result.output} (step {result.step})")


def _is_main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@main.command()
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(path_type=str),
              help="Adapter folder (adapter_config.json + adapter_model.safetensors, PEFT format).")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder to write the merged Hugging Face model to.")
@click.option("--base-model", default=None, type=click.Path(path_type=str),
              help="Full-precision base model: a folder or a Hub id org/name [default: the adapter's "
                   "base_model_name_or_path, at the revision it was trained on].")
@click.option("--revision", default=None, help="Hub branch, tag or commit of --base-model [default: main].")
@click.option("--dtype", default="bf16", show_default=True, metavar=DTYPE.metavar, help="Output weight dtype.")
@click.option("--base", "base_kind", default="dequantized", show_default=True, metavar=BASE.metavar,
              help="dequantized: merge onto the NF4 round trip of the base, the weights training saw (untargeted "
                   "block linears are written dequantized too), so the merged model is the trained model. "
                   "original: merge onto the full-precision base; untouched directions keep full precision, but "
                   "it is not the function that was trained (the magnitude was learned against the NF4 norms).")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest output shard (e.g. 500MB, 5GB).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUTPUT folder.")
def merge(adapter_dir: str, output: str, base_model: str | None, revision: str | None, dtype: str, base_kind: str,
          shard_size: str, overwrite: bool) -> None:
    """Merge an adapter into its base: a full-precision checkpoint that loads with plain transformers."""
    from qdora.export.merge import merge_adapter

    res = merge_adapter(adapter_dir, output, base_model=base_model, dtype=dtype, base=base_kind,
                        shard_size=shard_size, overwrite=overwrite, revision=revision)
    if res.prequantized_base:
        click.echo("the base is a pre-quantized bitsandbytes NF4 checkpoint: merged onto its dequantized weights "
                   "(the weights training saw; it holds no full-precision ones)")
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
@click.option("--base", "base_kind", default=None, metavar=BASE.metavar,
              help="W to compare against: the NF4 round trip training saw (default for adapters) or the "
                   "full-precision weights (default for --finetuned).")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder for decomposition.csv and decomposition.png.")
@click.argument("more_checkpoints", nargs=-1, type=click.Path(path_type=str))
def analyze(adapter_dir: str | None, finetuned: str | None, checkpoints: tuple[str, ...], base_model: str | None,
            base_kind: str | None, output: str, more_checkpoints: tuple[str, ...]) -> None:
    """Magnitude/direction change of each adapted weight (the DoRA paper's weight-decomposition analysis)."""
    from qdora.tools.analyze import run_analysis
    from qdora.tools.decomposition import format_table

    if more_checkpoints and not checkpoints:
        raise QdoraError(f"unexpected arguments {' '.join(more_checkpoints)}")
    rows, summary = run_analysis(output, adapter=adapter_dir, finetuned=finetuned,
                                 checkpoints=[*checkpoints, *more_checkpoints], base_model=base_model,
                                 base=base_kind)
    click.echo(format_table(summary))
    click.echo(f"{len(rows)} weights -> {output}/decomposition.csv, {output}/decomposition.png")


if __name__ == "__main__":
    main()
