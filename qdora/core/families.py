"""The model families qdora supports, one `Family` record each: what can be trained, merged and exported.

One registry answers "can qdora do this with that model?" for every command, so `qdora train` refuses a
model it could not export *before* hours of training (not at `qdora export`), and `plan`, `merge` and
`export` give the same answer in the same words. A family is keyed by the config's `model_type`; new
families (e.g. mixture-of-experts ones) join with `register(Family(...))` from the module that implements
them. Unknown model types and mixture-of-experts configs are refused with what is supported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdora.core.family_config import is_mixture_of_experts, model_type, read_config
from qdora.errors import QdoraError

log = logging.getLogger(__name__)

ACTIONS = ("train", "merge", "export")


@dataclass(frozen=True)
class Family:
    """What qdora can do with one `model_type`; `missing` says why for anything it cannot."""

    model_type: str
    name: str  # as users know it, e.g. "Gemma 3"
    train: bool = True
    merge: bool = True
    gguf_arch: str | None = None  # llama.cpp's architecture; None: no GGUF export
    chat_formats: tuple[str, ...] = ()  # Modelfile chat formats known for it (qdora.export.modelfile)
    missing: str = ""  # why an action is unsupported, shown in the refusal

    @property
    def export(self) -> bool:
        return self.gguf_arch is not None

    def can(self, action: str) -> bool:
        return bool(getattr(self, action))


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add (or replace) the record of `family.model_type`; returns it, so modules can keep a handle."""
    _REGISTRY[family.model_type] = family
    return family


def families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_REGISTRY.values())


def supported_names(action: str = "export") -> str:
    """`llama (Llama 2/3), ...`: the model types that can do `action`, for error messages and docs."""
    return ", ".join(f"{f.model_type} ({f.name})" for f in families() if f.can(action))


def family_of(cfg: dict[str, Any]) -> Family:
    """The family of a config dict; QdoraError naming what is supported when it is unknown."""
    mtype = model_type(cfg)
    family = _REGISTRY.get(mtype)
    if family is not None:
        return family
    what = "a mixture-of-experts model" if is_mixture_of_experts(cfg) else "not a family qdora knows"
    arch = ", ".join(cfg.get("architectures") or []) or mtype
    raise QdoraError(
        f"model family {mtype!r} ({arch}) is {what}: qdora supports {supported_names('train')}"
    )


def check_family(
    model: str | Path | dict[str, Any],
    actions: tuple[str, ...] = ACTIONS,
    allow_no_export: bool = False,
    command: str = "qdora train",
) -> Family:
    """Refuse, before anything is loaded or written, a model whose family cannot do every one of `actions`.

    With `allow_no_export`, a family that can do all but `export` only gets a warning: the user can still
    train and merge it, and use the merged checkpoint outside llama.cpp.
    """
    cfg = model if isinstance(model, dict) else read_config(model)
    family = family_of(cfg)
    lacking = [a for a in actions if not family.can(a)]
    if not lacking:
        return family
    why = f" ({family.missing})" if family.missing else ""
    message = (
        f"{family.name} ({family.model_type}) cannot be {_verbs(lacking)} by qdora{why}. "
        f"Supported for {lacking[0]}: {supported_names(lacking[0]) or 'none'}"
    )
    if lacking == ["export"] and allow_no_export:
        log.warning("%s; going on because of --allow-no-export (the merged model will not export to GGUF)",
                    message)
        return family
    if lacking == ["export"] and command == "qdora train":
        message += ". Pass --allow-no-export to train it anyway (train and merge work; GGUF export does not)"
    raise QdoraError(message)


def _verbs(actions: list[str]) -> str:
    past = {"train": "trained", "merge": "merged", "export": "exported to GGUF"}
    return " or ".join(past[a] for a in actions)


# The dense decoder families qdora implements end to end; chat formats name qdora.export.modelfile's.
register(Family("llama", "Llama 2/3/3.1/3.2", gguf_arch="llama", chat_formats=("llama3", "inst")))
register(Family("mistral", "Mistral 7B / Nemo / Small 3", gguf_arch="llama", chat_formats=("inst", "tekken")))
register(Family("qwen2", "Qwen2/2.5", gguf_arch="qwen2", chat_formats=("chatml",)))
register(Family("qwen3", "Qwen3 (dense)", gguf_arch="qwen3", chat_formats=("chatml",)))
register(Family("gemma2", "Gemma 2", gguf_arch="gemma2", chat_formats=("gemma",)))
register(Family("gemma3_text", "Gemma 3 (text)", gguf_arch="gemma3", chat_formats=("gemma",)))
register(Family("phi3", "Phi-3 / Phi-3.5 / Phi-4-mini", gguf_arch="phi3", chat_formats=("phi3", "phi4")))
# The image-text Gemma 3 checkpoints store the text tower as `language_model.model.*` beside a vision tower
# and projector; transformers renames those keys at load time, qdora's streaming loader, merge and export read
# checkpoint names as the module names, so these are refused by name (the text tower itself is a gemma3_text).
register(Family(
    "gemma3", "Gemma 3 image-text (Gemma3ForConditionalGeneration)", train=False, merge=False,
    missing="its checkpoint stores the text model as language_model.model.* beside a vision tower, and qdora "
            "reads plain causal-LM checkpoints. Use a text-only gemma3_text checkpoint (Gemma 3 1B, or the "
            "language model saved on its own with Gemma3ForCausalLM)",
))

# Mixture-of-experts families register themselves where they are implemented (torch-free module).
import qdora.core.moe_families  # noqa: E402, F401
