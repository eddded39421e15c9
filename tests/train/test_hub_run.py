"""A run from Hub names: the model from the Hub cache (offline), data from a dataset repository, revisions
recorded in train_config.yaml and the adapter, and merge finding the same base commit again."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from qdora.cli import main
from qdora.testing.demo_data import demo_records
from qdora.testing.hub_cache import add_to_hub_cache
from qdora.testing.runs import small_config
from qdora.testing.tiny_models import build_tiny_model
from qdora.train.config import read_yaml
from qdora.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
COMMIT = "abcdef0123456789abcdef0123456789abcdef01"
CARD = """---
configs:
- config_name: alpaca
  data_files:
  - split: train
    path: alpaca/train.jsonl
  - split: test
    path: alpaca/test.jsonl
---
"""


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    add_to_hub_cache(tmp_path / "hub", "org/tiny", build_tiny_model(tmp_path / "src"), COMMIT)
    return tmp_path / "hub"


@pytest.fixture
def data_repo(tmp_path):
    repo = tmp_path / "ds"
    (repo / "alpaca").mkdir(parents=True)
    rows = demo_records(40)
    for split, part in (("train", rows[:32]), ("test", rows[32:])):
        (repo / "alpaca" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (repo / "README.md").write_text(CARD)
    return repo


@pytest.mark.slow
def test_train_from_hub_names_records_revisions(hub, data_repo, tmp_path):
    out = tmp_path / "run"
    cfg = small_config("org/tiny", data_repo, out, data_config="alpaca", eval_split="test", max_steps=2)
    result = train(cfg)
    assert result.status == "done" and result.step == 2
    written = yaml.safe_load((out / "train_config.yaml").read_text())
    assert written["model"] == "org/tiny"
    assert written["resolved"]["model"] == {"name": "org/tiny", "revision": COMMIT}
    assert written["resolved"]["data"] == {"name": str(data_repo), "split": "train", "config": "alpaca",
                                           "revision": None}
    assert written["resolved"]["eval_data"]["split"] == "test"
    assert "resolved" not in read_yaml(out / "train_config.yaml")  # the file is a valid --config again
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "org/tiny" and adapter["revision"] == COMMIT
    assert "eval_loss" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    # merge finds the base by name, at the recorded commit, in the (offline) Hub cache
    merged = CliRunner().invoke(main, ["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "config.json").is_file()


def test_cli_flags_for_names(hub, data_repo, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "org/tiny", "--revision", "main", "--data", str(data_repo), "--data-config", "alpaca",
            "--data-split", "test", "--output", str(out), "--max-steps", "1", "--seq-len", "128", "--rank", "4",
            "--dtype", "fp32", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "train_config.yaml").read_text())["resolved"]["data"]["split"] == "test"


def test_missing_split_is_refused_before_output(hub, data_repo, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "org/tiny", "--data", str(data_repo), "--data-config", "alpaca", "--data-split",
            "validation", "--output", str(out), "--max-steps", "1", "--seq-len", "128", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "has no split 'validation': it has train, test" in result.output
    assert not out.exists()


def test_uncached_model_offline_is_refused_before_output(hub, data_repo, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", "org/other", "--data", str(data_repo), "--output",
                                       str(out), "--device", "cpu"])
    assert result.exit_code == 1 and "org/other is not in the Hub cache" in result.output
    assert not out.exists()
