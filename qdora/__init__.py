"""qdora: QDoRA (DoRA on a frozen NF4 base) fine-tuning, merge and GGUF export.

The public Python API, one name per step of the pipeline (imported on first use, so `import qdora` and
the CLI stay fast):

    prepare_data → load_model / adapt_model → qdora.train.train(TrainConfig) → save_adapter → merge_adapter
    → export_gguf   (or adapter → GGUF in one step: export_adapter_gguf)
    plan_memory (memory per GPU), run_analysis (weight-decomposition analysis)

Everything else is internal and may change between versions.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "QdoraError": "qdora.errors",
    # core: the model
    "AdapterSpec": "qdora.core.adapt",
    "adapt_model": "qdora.core.adapt",
    "QDoRALinear": "qdora.core.layer",
    "NF4Linear": "qdora.core.layer",
    "load_model": "qdora.core.load",
    "save_adapter": "qdora.core.adapter_io",
    "apply_adapter": "qdora.core.adapter_io",
    "load_adapter_weights": "qdora.core.adapter_io",
    # data and training
    "prepare_data": "qdora.data.prepare",
    "TrainConfig": "qdora.train.config",
    # after training
    "merge_adapter": "qdora.export.merge",
    "export_gguf": "qdora.export.gguf_export",
    "export_adapter_gguf": "qdora.export.adapter_gguf",
    "WriteFailure": "qdora.io.failures",
    # tools
    "plan_memory": "qdora.tools.plan",
    "run_analysis": "qdora.tools.analyze",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'qdora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
