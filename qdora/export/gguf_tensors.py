"""HF safetensors -> GGUF tensors: names, the Q/K layout llama.cpp expects, dtypes, streamed one at a time.

The GGUF header lists every tensor (name, shape, type, offset) before any data, so export is two passes:
`plan_tensors` reads only safetensors headers to build that list, then `write_tensor_data` loads, converts
and writes each tensor in turn, a block of rows at a time: memory stays bounded by one block (or one Q/K
matrix), never the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors import safe_open

from qdora.errors import QdoraError
from qdora.export.gguf_config import ModelSpec
from qdora.export.gguf_moe import expert_stacks, is_router
from qdora.io.weights import WeightReader

Q = gguf.GGMLQuantizationType
# --outtype -> (type of 2-D weights, general.file_type)
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# float32 bytes converted at once: bounds export memory whatever the model size.
CHUNK_BYTES = 64 * 2**20

# HF buffers that are recomputed from the config and must not be written.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class TensorPlan:
    """One GGUF tensor: where its data comes from and how it is converted."""

    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # numpy (row-major) order, as in the HF checkpoint
    qtype: Q
    source: str | None = None  # HF tensor name; None for tensors made here (rope_freqs)
    file: Path | None = None
    permute_heads: int | None = None  # Q/K rows to reorder from rotate-half to interleaved pairs
    data: np.ndarray | None = None  # for tensors made here
    shift: float = 0.0  # added to the values (Gemma's norms: HF stores w - 1, llama.cpp wants w)
    parts: tuple[tuple[str, Path], ...] = ()  # MoE: (HF name, file) of each expert, stacked along dim 0

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * type_size


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's adjacent-pair order, per head (rows of Q/K, or a bias).

    Within a head HF pairs dimension i with i + d/2; llama.cpp's llama arch pairs 2i with 2i + 1. Rows
    (r0..r_{d/2-1}, r_{d/2}..r_{d-1}) become (r0, r_{d/2}, r1, r_{d/2+1}, ...).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rotary` (GGUF -> HF), for round-trip checks."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _storage_type(shape: tuple[int, ...], weight_type: Q) -> Q:
    """1-D tensors (norms, biases) stay F32, as llama.cpp's converter does; Q8_0 needs rows of 32k."""
    if len(shape) == 1:
        return Q.F32
    if weight_type == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16
    return weight_type


def plan_tensors(spec: ModelSpec, outtype: str, shapes: dict[str, tuple[int, ...]] | None = None) -> list[TensorPlan]:
    """Map every checkpoint tensor to its GGUF name, type and conversion; add the generated ones.

    `shapes` (name -> shape) overrides the checkpoint's own tensor table: a pre-quantized base's weights have
    packed bytes and quant-state companions on disk, but the merged model they become has plain weights."""
    weight_type = OUTTYPES[outtype][0]
    rules = spec.rules
    name_map = gguf.get_tensor_name_map(rules.arch, spec.n_layer)
    reader = WeightReader(spec.model_dir)
    files = reader.files
    if shapes is None:
        shapes = {name: reader.shape(name) for name in files}
    tied = spec.tied_embeddings or rules.always_tied
    stacks = expert_stacks(list(shapes))
    first_part = {parts[0]: stack for stack, parts in stacks.items()}
    in_stack = {p for parts in stacks.values() for p in parts}
    plans = []
    for hf_name in sorted(shapes, key=_natural_key):
        if hf_name.endswith(_SKIP_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        if hf_name in in_stack:  # MoE: one stacked tensor per layer and projection, at its first expert
            if hf_name in first_part:
                plans.append(_stacked_plan(first_part[hf_name], stacks[first_part[hf_name]], shapes, files,
                                           name_map, weight_type))
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]):
            raise QdoraError(
                f"tensor {hf_name!r} has no GGUF counterpart for {spec.arch}: is this a plain merged "
                f"{spec.model_type} checkpoint (no adapter or quantization tensors left)?"
            )
        shape = shapes[hf_name]
        permute = None
        if spec.permute_qk and (".attn_q." in name or ".attn_k." in name):
            permute = spec.n_head if ".attn_q." in name else spec.n_head_kv
        if len(shape) == 2 and shape[0] == 1:  # Qwen2-MoE's shared_expert_gate [1, H]: squeezed, as the converter
            shape = shape[1:]
        qtype = Q.F32 if is_router(name) else _storage_type(shape, weight_type)
        shift = rules.norm_shift if hf_name.endswith("norm.weight") else 0.0
        plans.append(TensorPlan(name, shape, qtype, hf_name, files[hf_name], permute, shift=shift))
    names = {p.name for p in plans}
    if "token_embd.weight" not in names:
        raise QdoraError("the checkpoint has no model.embed_tokens.weight")
    if not tied and "output.weight" not in names:
        raise QdoraError("the checkpoint has no lm_head.weight and tie_word_embeddings is false")
    generated = [TensorPlan(n, d.shape, Q.F32, data=d) for n, d in rules.tensors(spec).items()]
    return generated + plans


def _stacked_plan(stack: str, parts: list[str], shapes: dict, files: dict, name_map, weight_type: Q) -> TensorPlan:
    """One GGUF tensor [E, out, in] written from the E per-expert checkpoint tensors, one after another."""
    name = name_map.get_name(stack, try_suffixes=(".weight",))
    part_shapes = {tuple(shapes[p]) for p in parts}
    if name is None or len(part_shapes) != 1:
        raise QdoraError(f"the experts of {stack} have no GGUF counterpart or differ in shape")
    shape = (len(parts), *part_shapes.pop())
    return TensorPlan(name, shape, _storage_type(shape, weight_type), parts=tuple((p, files[p]) for p in parts))


def _natural_key(name: str) -> list[object]:
    """Sort layers numerically (2 before 10) so the file reads in model order."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return data.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)  # BF16, Q8_0: gguf's own (round-to-nearest) encoders


def add_tensor_infos(writer: gguf.GGUFWriter, plans: list[TensorPlan]) -> None:
    """Declare every tensor in the header (shape in numpy order; GGUFWriter reverses it)."""
    for p in plans:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)


def _row_ranges(p: TensorPlan, chunk_bytes: int) -> list[slice]:
    """Row blocks of about `chunk_bytes` float32 bytes. Q/K (permuted across rows) and 1-D go whole;
    every GGUF type here encodes rows independently, so chunked output is byte-identical to whole."""
    if p.data is not None or p.permute_heads or len(p.shape) < 2:
        return [slice(None)]
    step = max(1, chunk_bytes // (4 * int(np.prod(p.shape[1:]))))
    return [slice(i, min(i + step, p.shape[0])) for i in range(0, p.shape[0], step)]


# Where a tensor's data comes from: given its plan (and an ExitStack for whatever must be closed after the
# tensor), something sliceable by rows that yields torch tensors. By default the checkpoint's safetensors
# file; a one-step adapter export hands out merged weights instead (qdora.export.adapter_gguf).
TensorSource = Callable[[TensorPlan, contextlib.ExitStack], Any]


def safetensors_source(p: TensorPlan, stack: contextlib.ExitStack) -> Any:
    """A lazy slice of the tensor in its safetensors file. A fresh mapping per tensor: closing it lets the
    pages already read go, so resident memory does not grow with the checkpoint."""
    assert p.file is not None and p.source is not None
    return stack.enter_context(safe_open(p.file, framework="pt")).get_slice(p.source)


def write_tensor_data(
    writer: gguf.GGUFWriter, plans: list[TensorPlan], chunk_bytes: int | None = None,
    source: TensorSource = safetensors_source,
) -> None:
    """Stream the tensors into the file in the order `add_tensor_infos` declared them, converting a block
    of rows at a time (a 128k x 8k embedding is 4 GiB in float32; a block is CHUNK_BYTES)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    assert writer.fout is not None and len(writer.fout) == 1
    fout = writer.fout[0]
    for p in plans:
        writer.write_padding(fout, fout.tell())  # each tensor starts aligned, as GGUFWriter does
        written = 0
        # A stacked expert tensor is written expert after expert (rows encode independently, so the bytes
        # are those of the stacked tensor); anything else is its own single piece.
        pieces = [TensorPlan(p.name, p.shape[1:], p.qtype, src, file) for src, file in p.parts] or [p]
        for piece in pieces:
            with contextlib.ExitStack() as stack:
                tensor = None if piece.data is not None else source(piece, stack)
                for rows in _row_ranges(piece, chunk_bytes):
                    data = piece.data if tensor is None else tensor[rows].float().numpy()
                    if piece.permute_heads:
                        data = permute_rotary(data, piece.permute_heads)
                    if piece.shift:
                        data = data + np.float32(piece.shift)
                    encoded = np.ascontiguousarray(_encode(data, piece.qtype))
                    fout.write(encoded.data)  # a Python write: a full disk raises OSError(ENOSPC), not numpy's
                    # errno-less "N requested and M written"
                    written += encoded.nbytes
        if written != p.nbytes:
            raise AssertionError(f"{p.name}: wrote {written} bytes, planned {p.nbytes}")
        writer.write_padding(fout, written)
