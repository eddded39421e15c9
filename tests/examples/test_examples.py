"""Every YAML in examples/ is a valid `qdora train` config, and its own `# check:` line (`qdora plan --config
...`) says it fits the hardware it names. Offline, the Hub model is planned with the preset of its shape."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from qdora.cli import main
from qdora.train.config import read_yaml, resolve_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# the published shapes of the examples' models (qdora/tools/presets.py), for planning without the network
SHAPES = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.1-8B": "llama-3-8b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3-70b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b",
}
YAMLS = sorted(EXAMPLES.glob("*.yaml"))


def test_the_common_cases_are_there():
    names = {p.name for p in YAMLS}
    assert {"llama3-8b-chat-1x24gb.yaml", "llama3-70b-chat-2x24gb.yaml", "qwen2.5-7b-chat.yaml",
            "mistral-7b-chat.yaml", "alpaca-completion-only.yaml"} <= names


def _check_line(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("# check: qdora plan ")]
    assert len(lines) == 1, f"{path.name} needs exactly one '# check: qdora plan --config ...' line"
    args = shlex.split(lines[0].removeprefix("# check: qdora "))
    assert args[:3] == ["plan", "--config", f"examples/{path.name}"], args
    return args


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_example_loads_and_fits_its_hardware(path, monkeypatch):
    cfg = resolve_config(read_yaml(path), {})  # exactly what `qdora train --config` does first
    assert cfg.model in SHAPES, f"add {cfg.model}'s shape to SHAPES (and a preset if needed)"
    args = _check_line(path)
    monkeypatch.chdir(EXAMPLES.parent)
    result = CliRunner().invoke(main, [*args, "--model", SHAPES[cfg.model]])
    assert result.exit_code == 0, result.output
    assert "fits" in result.output.splitlines()[-1] and "does not fit" not in result.output
    if "70b" in path.name:  # the several-GPU example says how to launch it
        assert "torchrun --nproc_per_node 2 -m qdora.cli train --config examples/" + path.name in path.read_text()


def test_plan_takes_the_config_and_flags_override_it(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model: llama-3-70b\ndata: d.jsonl\noutput: out\nseq_len: 4096\nrank: 8\noffload: all\n")
    res = CliRunner().invoke(main, ["plan", "--config", str(yaml), "--gpus", "2", "--json"])
    assert res.exit_code == 0, res.output
    import json

    settings = json.loads(res.output)["settings"]
    assert (settings["seq_len"], settings["rank"], settings["offload"], settings["gpus"]) == (4096, 8, "all", 2)
    res = CliRunner().invoke(main, ["plan", "--config", str(yaml), "--gpus", "2", "--seq-len", "1024", "--json"])
    assert json.loads(res.output)["settings"]["seq_len"] == 1024
