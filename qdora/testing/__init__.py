"""Tiny local models, tokenizers and data for the demo, the tests and the benchmarks (nothing is downloaded)."""
