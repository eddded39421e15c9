"""`qdora train`: options, the loop, the loss, checkpoints and exact resume, metrics, FSDP2 distribution.

`qdora.train.train(TrainConfig(...))` runs a training; it is imported on first use so that reading the
options (`qdora.train.config`) does not import the whole engine.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from qdora.train import loop

        return getattr(loop, name)
    if name == "TrainConfig":
        from qdora.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'qdora.train' has no attribute {name!r}")
