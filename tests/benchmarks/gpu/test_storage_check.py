"""The storage check's own parts: every 16-bit pattern exactly once, and a changed word is counted."""

from __future__ import annotations

import torch

from benchmarks.gpu.storage_check import PATTERNS, all_patterns, bits, changed_words


def test_every_pattern_once():
    p = all_patterns()
    assert p.numel() == PATTERNS and p.unique().numel() == PATTERNS
    nan = p.view(torch.bfloat16).isnan().sum().item()
    assert nan == 2 * 127  # exponent all ones, mantissa non-zero, either sign


def test_changed_words_sees_nan_canonicalisation():
    ref = bits(all_patterns())
    through_fp32 = bits(all_patterns().view(torch.bfloat16).float().to(torch.bfloat16))
    assert changed_words(ref, ref.clone()) == 0
    assert 0 < changed_words(ref, through_fp32) <= 254  # the NaN patterns (the canonical one survives)
    assert changed_words(ref, ref[:10]) == PATTERNS
