"""qdora: QDoRA (DoRA on a frozen NF4 base) fine-tuning, merge and GGUF export."""

__version__ = "0.1.0"
