"""The parts of a Hugging Face config.json that decide which model family it is, read without transformers.

Kept free of torch and transformers so that `qdora train`, `plan`, `merge` and `export` can refuse an
unsupported family before anything heavy is imported, loaded or written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qdora.errors import QdoraError

# Keys whose presence (with a value above 1) marks a mixture-of-experts model, across families' spellings.
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model folder (or the file itself) as a dict; one clear error when it cannot be read."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise QdoraError(f"{model_dir} has no config.json: pass a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QdoraError(f"cannot read model config {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise QdoraError(f"{path} is not a JSON object")
    return cfg


def model_type(cfg: dict[str, Any]) -> str:
    """The config's `model_type` (what transformers dispatches on), or a clear error if it has none."""
    value = cfg.get("model_type")
    if not isinstance(value, str) or not value:
        names = ", ".join(cfg.get("architectures") or []) or "no architectures"
        raise QdoraError(f"config.json has no model_type ({names}): qdora cannot tell the model family")
    return value


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: `text_config` of a multimodal checkpoint, else the config itself."""
    sub = cfg.get("text_config")
    return sub if isinstance(sub, dict) else cfg


def is_mixture_of_experts(cfg: dict[str, Any]) -> bool:
    """True when the config (or its text tower) declares more than one expert per layer."""
    for c in (cfg, text_config(cfg)):
        for key in EXPERT_KEYS:
            value = c.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return True
    return False
