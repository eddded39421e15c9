"""What differs between the llama.cpp architectures qdora writes: one `ArchRules` per GGUF arch.

Each record says how llama.cpp's graph for that arch reads a checkpoint (Q/K row order, activation, rope
kinds, norm-weight offset, extra hyperparameters and generated tensors) and checks the settings its runtime
cannot reproduce, so export refuses them before writing. The arch-specific functions live in
`gguf_<arch>.py`; llama.cpp's converter (`convert_hf_to_gguf.py`, `conversion/*.py`) is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gguf
import numpy as np

from qdora.errors import QdoraError
from qdora.export import gguf_gemma, gguf_moe, gguf_phi3, gguf_rope

if TYPE_CHECKING:
    from qdora.export.gguf_config import ModelSpec


def _nothing(*_args) -> None:
    return None


def _no_attention_bias(spec: ModelSpec) -> None:
    if spec.cfg.get("attention_bias"):
        raise QdoraError(f"attention_bias=true: llama.cpp's {spec.arch} has no q/k/v/o biases")


def _qwen3moe_check(spec: ModelSpec) -> None:
    _no_attention_bias(spec)
    gguf_moe.check_moe(spec)


def _no_tensors(_spec: ModelSpec) -> dict[str, np.ndarray]:
    return {}


@dataclass(frozen=True)
class ArchRules:
    """How one llama.cpp architecture reads a Hugging Face checkpoint."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama arch: HF rotate-half rows -> llama.cpp's adjacent pairs
    hidden_acts: tuple[str, ...] = ("silu",)
    rope_types: tuple[str, ...] = ("default", "linear", "yarn")
    norm_shift: float = 0.0  # added to every `*norm.weight` (Gemma stores w - 1, llama.cpp multiplies by w)
    always_tied: bool = False  # llama.cpp reuses token_embd as the output (Gemma), lm_head is not written
    write_head_dim: bool = False  # key/value length written even when head_dim = hidden / heads
    check: Callable[[ModelSpec], None] = _nothing  # raise QdoraError for what llama.cpp cannot run
    hparams: Callable[[gguf.GGUFWriter, ModelSpec], None] = _nothing  # the arch's own GGUF keys
    tensors: Callable[[ModelSpec], dict[str, np.ndarray]] = _no_tensors  # generated (rope factors)


ARCH_RULES: dict[str, ArchRules] = {
    # Mixtral is llama.cpp's llama arch with experts: the MoE keys and checks do nothing for dense Llamas
    "llama": ArchRules(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_types=("default", "llama3", "linear"),
                       tensors=gguf_rope.llama3_tensors, check=gguf_moe.check_moe, hparams=gguf_moe.moe_hparams),
    "qwen2": ArchRules(gguf.MODEL_ARCH.QWEN2),
    "qwen3": ArchRules(gguf.MODEL_ARCH.QWEN3, write_head_dim=True, check=_no_attention_bias),
    "qwen3moe": ArchRules(gguf.MODEL_ARCH.QWEN3MOE, write_head_dim=True, check=_qwen3moe_check,
                          hparams=gguf_moe.moe_hparams),
    "qwen2moe": ArchRules(gguf.MODEL_ARCH.QWEN2MOE, check=gguf_moe.check_moe, hparams=gguf_moe.moe_hparams),
    "gemma2": ArchRules(gguf.MODEL_ARCH.GEMMA2, hidden_acts=gguf_gemma.GELU_TANH, rope_types=("default",),
                        norm_shift=1.0, always_tied=True, write_head_dim=True,
                        check=gguf_gemma.check_gemma2, hparams=gguf_gemma.gemma2_hparams),
    "gemma3": ArchRules(gguf.MODEL_ARCH.GEMMA3, hidden_acts=gguf_gemma.GELU_TANH, rope_types=("default", "linear"),
                        norm_shift=1.0, always_tied=True, write_head_dim=True,
                        check=gguf_gemma.check_gemma3, hparams=gguf_gemma.gemma3_hparams),
    "phi3": ArchRules(gguf.MODEL_ARCH.PHI3, rope_types=("default", "longrope"), check=gguf_phi3.check_phi3,
                      hparams=gguf_phi3.phi3_hparams, tensors=gguf_phi3.phi3_tensors),
}
