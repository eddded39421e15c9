"""The quality benchmark: DoRA vs LoRA vs full fine-tuning on a synthetic shifted-facts task."""
