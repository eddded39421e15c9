"""`qdora export`: a merged Hugging Face checkpoint -> one GGUF file for llama.cpp / Ollama.

Every check runs before the output is opened; the file is written under a temporary name in the target
folder and renamed at the very end, so a failed or interrupted export never leaves a partial GGUF.
Before writing, the output folder must be writable and hold the GGUF and every requested quantization
(sizes from the tensor table: `gguf_size`); a disk that fills up anyway gives the same one message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import gguf

from qdora.errors import QdoraError, doing
from qdora.export.gguf_config import ModelSpec, read_spec, write_hparams
from qdora.export.gguf_size import gguf_bytes, quantized_bytes
from qdora.export.gguf_tensors import (
    OUTTYPES,
    TensorPlan,
    TensorSource,
    add_tensor_infos,
    plan_tensors,
    safetensors_source,
    write_tensor_data,
)
from qdora.export.gguf_tokenizer import VocabInfo, read_vocab, write_vocab
from qdora.export.llamacpp_quantize import llama_ftype, quantize_gguf, quantized_path
from qdora.export.modelfile import chat_format, write_modelfile
from qdora.io.atomic import atomic_write
from qdora.io.os_errors import writing
from qdora.io.preflight import check_output

log = logging.getLogger(__name__)


def export_gguf(
    model_dir: str | Path,
    output_path: str | Path,
    outtype: str = "f16",
    modelfile: bool = False,
    quantize: str | Sequence[str] | None = None,
    *,
    name: str | None = None,
    source: TensorSource = safetensors_source,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Write `output_path` (GGUF, weights in `outtype`: f16, bf16, f32 or q8_0) from a merged model.

    `quantize` (e.g. "Q4_K_M", or several) additionally runs llama.cpp's quantizer on the result,
    writing `<stem>.<TYPE>.gguf` next to it. `modelfile` writes an Ollama `Modelfile` beside the
    files. Returns the GGUF a user would run: the first quantized file if any, else `output_path`.
    `name` (general.name, default the folder's name) and `source` (where tensor data comes from,
    default the folder's safetensors) let `export_adapter_gguf` feed merged weights in a stream; `shapes`
    (name -> shape of every tensor `source` gives) replaces the folder's tensor table where they differ.
    """
    model_dir, output_path, outtype = Path(model_dir), Path(output_path), outtype.lower()
    if outtype not in OUTTYPES:
        raise QdoraError(f"unknown outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    qtypes = [quantize] if isinstance(quantize, str) else list(quantize or [])
    for qtype in qtypes:
        llama_ftype(qtype)  # llama-cpp-python present and the name known, before anything is written
    if not output_path.parent.is_dir():
        raise QdoraError(f"output folder {output_path.parent} does not exist")
    spec = read_spec(model_dir)
    if name is not None:
        spec = dataclasses.replace(spec, name=name)
    config_ids = _config_special_ids(model_dir)
    vocab = read_vocab(model_dir, spec.vocab_rows, config_ids)
    if modelfile:
        chat_format(vocab)  # fail now, not after the weights are written
    plans = plan_tensors(spec, outtype, shapes)
    size = gguf_bytes(plans)
    sizes = {qtype: quantized_bytes(plans, qtype) for qtype in qtypes}
    what = "the GGUF file" + (f" and its {', '.join(qtypes)} quantization" if qtypes else "")
    check_output(output_path, size + sum(sizes.values()), what)

    with writing(output_path, "the GGUF file", size), doing(f"writing {output_path}"):
        _write_atomically(output_path, spec, vocab, plans, outtype, source)
    log.info("wrote %s", output_path)
    final = output_path
    for i, qtype in enumerate(qtypes):
        target = quantized_path(output_path, qtype)
        with writing(target, f"the {qtype} GGUF file", sizes[qtype]), doing(f"quantizing to {qtype}"):
            path = quantize_gguf(output_path, target, qtype)
        log.info("wrote %s", path)
        if i == 0:
            final = path
    if modelfile:
        with writing(final.parent / "Modelfile", "the Ollama Modelfile"):
            log.info("wrote %s", write_modelfile(final, vocab))
    return final


def _config_special_ids(model_dir: Path) -> dict[str, int | None]:
    """Fallback special ids from config.json (Qwen2's tokenizer has no BOS; its config names one)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    ids = {}
    for kind in ("bos", "eos", "pad"):
        value = cfg.get(f"{kind}_token_id")
        ids[kind] = value[0] if isinstance(value, list) and value else value
    return ids


def _write_atomically(
    output_path: Path, spec: ModelSpec, vocab: VocabInfo, plans: list[TensorPlan], outtype: str,
    source: TensorSource,
) -> None:
    """Header, metadata, tensor table, then tensor data streamed one at a time, into a temp file."""

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, spec.arch)
        try:
            write_hparams(writer, spec, OUTTYPES[outtype][1])
            write_vocab(writer, vocab)
            add_tensor_infos(writer, plans)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            write_tensor_data(writer, plans, source=source)
        finally:
            writer.close()

    atomic_write(output_path, write)
