"""Datasets by name / repository layout go through datasets' own builder: configs, splits, errors."""

from __future__ import annotations

import json

import pytest

from qdora.data.hub_data import RepoSelect, is_dataset_repo_dir, load_repo
from qdora.data.sources import load_sources
from qdora.errors import QdoraError
from qdora.testing.hub_cache import refusing_hub

CARD = """---
configs:
- config_name: qa
  data_files:
  - split: train
    path: qa/train.jsonl
  - split: test
    path: qa/test.jsonl
- config_name: plain
  data_files:
  - split: train
    path: plain/train.jsonl
---
# A dataset card
"""


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def card_repo(tmp_path):
    repo = tmp_path / "card_repo"
    _jsonl(repo / "qa" / "train.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)])
    _jsonl(repo / "qa" / "test.jsonl", [{"instruction": "tq", "output": "ta"}])
    _jsonl(repo / "plain" / "train.jsonl", [{"text": "hello"}, {"text": "world"}])
    (repo / "README.md").write_text(CARD)
    return repo


@pytest.fixture
def data_dir_repo(tmp_path):
    import datasets

    repo = tmp_path / "data_repo"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict({"text": ["z"]}).to_parquet(repo / "data" / "validation-00000-of-00001.parquet")
    return repo


def test_layouts_are_recognised(card_repo, data_dir_repo, tmp_path):
    assert is_dataset_repo_dir(card_repo) and is_dataset_repo_dir(data_dir_repo)
    _jsonl(tmp_path / "plain_folder" / "a.jsonl", [{"text": "x"}])
    assert not is_dataset_repo_dir(tmp_path / "plain_folder")


def test_config_and_split_are_chosen(card_repo):
    rows, commit = load_repo(str(card_repo), RepoSelect(split="test", config="qa"))
    assert rows["instruction"] == ["tq"] and commit is None
    rows, _ = load_repo(str(card_repo), RepoSelect(config="plain"))
    assert rows["text"] == ["hello", "world"]


def test_data_folder_splits_by_file_name(data_dir_repo):
    rows, _ = load_repo(str(data_dir_repo), RepoSelect(split="validation"))
    assert rows["text"] == ["z"]
    [source] = load_sources(data_dir_repo)
    assert source.rows["text"] == ["a", "b", "c"] and source.where(1) == f"{data_dir_repo} [train], row 2"


def test_unknown_split_names_the_ones_there_are(data_dir_repo):
    with pytest.raises(QdoraError, match=r"has no split 'test': it has train, validation"):
        load_repo(str(data_dir_repo), RepoSelect(split="test"))


def test_unknown_config_is_one_message(card_repo):
    with pytest.raises(QdoraError, match=r"dataset .*card_repo: .*nope"):
        load_repo(str(card_repo), RepoSelect(config="nope"))


def test_revision_on_a_local_folder_is_refused(card_repo):
    with pytest.raises(QdoraError, match="applies to Hub datasets"):
        load_repo(str(card_repo), RepoSelect(config="qa", revision="main"))


@pytest.fixture
def datasets_hub(monkeypatch, tmp_path):
    """datasets and huggingface_hub pointed at a given endpoint, with empty caches."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")

    def point(endpoint: str | None, offline: bool = False) -> None:
        for mod in (constants, datasets.config):
            monkeypatch.setattr(mod, "HF_HUB_OFFLINE", offline)
        if endpoint:  # what HF_ENDPOINT sets (huggingface_hub rewrites its default URLs to it)
            monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)

    return point


def test_offline_dataset_name_is_one_clear_message(datasets_hub):
    datasets_hub(None, offline=True)
    with pytest.raises(QdoraError, match=r"dataset org/absent is not in the datasets cache and the Hub cannot be "):
        load_sources("org/absent")


def test_gated_dataset_is_one_clear_message(datasets_hub):
    with refusing_hub(403, "GatedRepo", "Access to dataset org/gated is restricted.") as endpoint:
        datasets_hub(endpoint)
        with pytest.raises(QdoraError, match=r"dataset org/gated is gated: accept its terms"):
            load_sources("org/gated")


def test_missing_dataset_is_one_clear_message(datasets_hub):
    with refusing_hub(404, "RepoNotFound", "Repository not found") as endpoint:
        datasets_hub(endpoint)
        with pytest.raises(QdoraError, match=r"dataset org/nope: no such local path, and no such dataset"):
            load_sources("org/nope")
