"""The quality benchmark's smoke mode: it runs end to end on CPU, and fine-tuning really learns something.

The untuned base has never seen the new question format nor the new countries, so its answer-token
accuracy on held-out questions is low and its loss high; at least one fine-tuning method must do clearly
better on both after the quick run (answer-token accuracy, since a 50-step smoke run is too short for
many exact answers).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality.bench import Config, run
from benchmarks.quality.report import BEGIN, END, TITLE, markdown_section, write_section
from benchmarks.quality.world import make_world


def test_world_splits_are_disjoint_and_held_out():
    world = make_world(n_pre=40, n_new=16)
    pre_entities = {f.entity for f in world.pre}
    assert not pre_entities & {f.entity for f in world.new}
    held = world.val + world.test
    assert not set(held) & set(world.new_train_qa)
    assert set(held) | set(world.new_train_qa) == set(world.new)
    assert not set(world.val) & set(world.test)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    torch.set_num_threads(1)
    return run(Config.quick(), tmp_path_factory.mktemp("quality"), log=lambda s: None)


@pytest.mark.slow
def test_quick_run_structure(quick):
    results = quick
    final = {r["method"]: r for r in results["final"]}
    assert list(final) == ["full fine-tuning", "qdora lora r=8", "qdora dora r=8", "qdora dora r=4"]
    counts = {k: v["trainable"] for k, v in final.items()}
    assert counts["full fine-tuning"] > counts["qdora dora r=8"] > counts["qdora lora r=8"] > counts["qdora dora r=4"]
    for r in results["final"]:
        for split in ("val", "test", "seen"):
            assert 0.0 <= r[split]["exact"] <= 1.0 and 0.0 <= r[split]["token_acc"] <= 1.0


@pytest.mark.slow
def test_finetuning_beats_the_untuned_base_on_held_out_questions(quick):
    untuned = quick["reference"]["base (untuned, fp32)"]
    best_acc = max(r["test"]["token_acc"] for r in quick["final"])
    best_loss = min(r["test"]["loss"] for r in quick["final"])
    assert best_acc > untuned["token_acc"] + 0.15
    assert best_loss < untuned["loss"] - 0.5


@pytest.mark.slow
def test_section_replaces_only_itself(quick, tmp_path):
    section = markdown_section(quick, "python -m benchmarks.quality --quick")
    assert section.startswith(BEGIN) and TITLE in section and section.rstrip().endswith(END)
    assert "| qdora dora r=4 |" in section
    path = tmp_path / "RESULTS.md"
    path.write_text("# results\n\n## Speed\n\nfast\n")
    write_section(path, section)
    write_section(path, section.replace("qdora dora r=4", "qdora dora r=four"))
    text = path.read_text()
    assert text.count(BEGIN) == 1 and "## Speed\n\nfast" in text and "r=four" in text
