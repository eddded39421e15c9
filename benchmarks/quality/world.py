"""The synthetic world of the quality benchmark: made-up countries, their facts, and two text formats.

Why synthetic: no model or data set may be downloaded, and a made-up world lets us control exactly
which facts the base model saw. Pretraining teaches facts about `pre` countries in declarative
sentences and an old "Q: ... A: ..." format. The fine-tuning task is shifted on two axes at once:
countries never seen in pretraining (`new`), and a new "Ask: ... / Say: ..." question format.
The fine-tuning set states every fact of the new countries declaratively, but asks only half of them
in the new format; the other half (split into validation and test) are the held-out questions, so a
correct answer means the model stored a fact from the statements and can retrieve it in the new format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_SYLLABLES = ["zor", "vi", "quel", "ta", "mar", "on", "bel", "ka", "dru", "sen", "lo", "pra", "xi", "ner",
              "fu", "gal", "ith", "mo", "ru", "vek", "sha", "tin", "dor", "el", "ba", "kry", "no", "hu"]

VALUES: dict[str, list[str]] = {
    "capital": ["Quelt", "Ardon", "Bresk", "Calim", "Dovra", "Estel", "Fornu", "Gesta", "Hollin", "Ivra",
                "Jaska", "Kemet", "Lorin", "Mesca", "Norvo", "Ostra", "Pelim", "Rasko", "Sulva", "Tirno"],
    "colour": ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"],
    "food": ["plums", "rice", "bread", "fish", "beans", "honey", "cheese", "olives", "nuts", "figs"],
    "animal": ["cat", "dog", "fox", "owl", "horse", "mouse", "eagle", "whale", "bear", "wolf"],
}
ATTRIBUTES = list(VALUES)

STATEMENTS: dict[str, list[str]] = {
    "capital": ["The capital of {e} is {v}.", "{e} is governed from the city of {v}."],
    "colour": ["The flag of {e} is {v}.", "{e} flies the {v} flag."],
    "food": ["People in {e} mostly eat {v}.", "The main food of {e} is {v}."],
    "animal": ["The national animal of {e} is the {v}.", "In {e} the sacred animal is the {v}."],
}
OLD_QUESTIONS = {
    "capital": "Q: What is the capital of {e}? A:",
    "colour": "Q: What colour is the flag of {e}? A:",
    "food": "Q: What do people in {e} eat? A:",
    "animal": "Q: What is the national animal of {e}? A:",
}
NEW_QUESTIONS = {
    "capital": "Ask: {e} / seat of government?\nSay:",
    "colour": "Ask: {e} / banner hue?\nSay:",
    "food": "Ask: {e} / staple dish?\nSay:",
    "animal": "Ask: {e} / emblem creature?\nSay:",
}


@dataclass(frozen=True)
class Fact:
    """One (country, attribute, value) triple."""

    entity: str
    attribute: str
    value: str

    def statement(self, template: int) -> str:
        return STATEMENTS[self.attribute][template].format(e=self.entity, v=self.value)

    def old_qa(self) -> tuple[str, str]:
        return OLD_QUESTIONS[self.attribute].format(e=self.entity), f" {self.value}."

    def new_qa(self) -> tuple[str, str]:
        return NEW_QUESTIONS[self.attribute].format(e=self.entity), f" {self.value}."


@dataclass
class World:
    """All facts, split by role: pretraining countries, and the new countries' train/val/test questions."""

    pre: list[Fact] = field(default_factory=list)
    new: list[Fact] = field(default_factory=list)
    new_train_qa: list[Fact] = field(default_factory=list)
    val: list[Fact] = field(default_factory=list)
    test: list[Fact] = field(default_factory=list)
    bridge: list[Fact] = field(default_factory=list)


def make_names(n: int, rng: random.Random) -> list[str]:
    """n distinct made-up country names of 2-3 syllables (so BPE splits them into known pieces)."""
    names: set[str] = set()
    while len(names) < n:
        k = rng.choice([2, 3])
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(k)).capitalize())
    return sorted(names)


def make_world(n_pre: int = 240, n_new: int = 96, n_bridge: int = 240, seed: int = 1234) -> World:
    """Generate the world. The split is fixed by `seed` (the same for every method and training seed)."""
    rng = random.Random(seed)
    names = make_names(n_pre + n_new, rng)
    rng.shuffle(names)

    def facts_of(entity: str) -> list[Fact]:
        return [Fact(entity, a, rng.choice(VALUES[a])) for a in ATTRIBUTES]

    world = World()
    world.pre = [f for e in names[:n_pre] for f in facts_of(e)]
    held: list[Fact] = []
    for e in names[n_pre:]:
        facts = facts_of(e)
        world.new += facts
        rng.shuffle(facts)  # half of each new country's facts are asked in training, half held out
        world.new_train_qa += facts[:2]
        held += facts[2:]
    rng.shuffle(held)
    world.val, world.test = held[: len(held) // 2], held[len(held) // 2:]
    world.bridge = rng.sample(world.pre, min(n_bridge, len(world.pre)))
    return world


def _by_entity(facts: list[Fact]) -> dict[str, list[Fact]]:
    out: dict[str, list[Fact]] = {}
    for f in facts:
        out.setdefault(f.entity, []).append(f)
    return out


def pretrain_documents(world: World, rng: random.Random) -> list[str]:
    """One profile per pretraining country: each fact once, in a random form (either statement or old Q/A).

    Each fact appears once per document on purpose: were it repeated, the model would learn to copy it
    from context instead of storing it, and could not answer a question asked on its own.
    """
    docs = []
    for facts in _by_entity(world.pre).values():
        lines = []
        for f in facts:
            form = rng.randrange(3)
            lines.append("".join(f.old_qa()) if form == 2 else f.statement(form))
        rng.shuffle(lines)
        docs.append(" ".join(lines))
    return docs


def finetune_statements(world: World, rng: random.Random) -> list[str]:
    """One profile per new country: its four facts, each once, in a random statement form."""
    docs = []
    for facts in _by_entity(world.new).values():
        lines = [f.statement(rng.randrange(2)) for f in facts]
        rng.shuffle(lines)
        docs.append(" ".join(lines))
    return docs


def tokenizer_corpus(world: World) -> list[str]:
    """Text the BPE tokenizer is trained on: the pretraining corpus only (new names split into its pieces)."""
    rng = random.Random(0)
    docs = [d for _ in range(3) for d in pretrain_documents(world, rng)]
    return docs + [NEW_QUESTIONS[a].format(e="X") for a in ATTRIBUTES]
