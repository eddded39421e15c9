"""The demo's and the tests' tiny training data: templated sentences and a learnable question/answer set."""

from __future__ import annotations

import random

_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
_ANIMALS = ["cat", "dog", "fox", "owl", "horse", "mouse", "eagle", "whale"]
_PLACES = ["forest", "river", "city", "garden", "desert", "mountain", "harbour", "valley"]
_VERBS = ["sees", "follows", "finds", "greets", "watches", "helps"]


def demo_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic templated sentences: enough structure for a tiny model to learn quickly."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.sample(_ANIMALS, 2)
        lines.append(
            f"The {rng.choice(_COLOURS)} {a} {rng.choice(_VERBS)} the {b} near the "
            f"{rng.choice(_PLACES)}. It counts {rng.randint(1, 999)} stars."
        )
    return lines


def demo_records(n: int = 200, seed: int = 1) -> list[dict[str, str]]:
    """Alpaca-style records of a simple, learnable mapping: the colour of a named animal."""
    rng = random.Random(seed)
    colour_of = {a: _COLOURS[i % len(_COLOURS)] for i, a in enumerate(_ANIMALS)}
    records = []
    for _ in range(n):
        animal = rng.choice(_ANIMALS)
        records.append(
            {
                "instruction": f"What colour is the {animal}?",
                "input": "",
                "output": f"The {animal} is {colour_of[animal]}.",
            }
        )
    return records
