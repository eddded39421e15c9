"""Models by Hub name: resolved by the real huggingface_hub from a cache laid out on disk, never the network."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qdora.errors import QdoraError
from qdora.io.hub import looks_like_repo_id, resolve_model
from qdora.testing.hub_cache import add_to_hub_cache, closed_port_endpoint, refusing_hub
from qdora.testing.tiny_models import build_tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hub cache, huggingface_hub pointed at it (as HF_HOME/HF_HUB_CACHE would), offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_repo_ids_and_paths_are_told_apart():
    assert looks_like_repo_id("meta-llama/Llama-3.1-8B") and looks_like_repo_id("gpt2")
    for path in ("./m", "../m", "/abs/m", "~/m", "a/b/c"):
        assert not looks_like_repo_id(path)


def test_local_folder_wins_over_a_cached_repo_of_the_same_name(hub, tiny, tmp_path, monkeypatch):
    add_to_hub_cache(hub, "org/m", tiny, COMMIT)
    (tmp_path / "org").mkdir()
    local = build_tiny_model(tmp_path / "org" / "m", seed=1)
    monkeypatch.chdir(tmp_path)
    got = resolve_model("org/m")
    assert got.path == local.relative_to(tmp_path) and got.repo_id is None and got.commit is None
    assert got.name == str(local.resolve())


def test_offline_name_resolves_from_the_cache_with_its_commit(hub, tiny):
    add_to_hub_cache(hub, "org/tiny", tiny, COMMIT)
    got = resolve_model("org/tiny")
    assert got.repo_id == "org/tiny" and got.commit == COMMIT
    assert got.path == hub / "models--org--tiny" / "snapshots" / COMMIT
    assert (got.path / "config.json").read_bytes() == (tiny / "config.json").read_bytes()
    assert got.record() == {"name": "org/tiny", "revision": COMMIT}


def test_revision_picks_a_branch_or_commit_from_the_cache(hub, tiny, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=3)
    add_to_hub_cache(hub, "org/tiny", tiny, COMMIT)
    second = "f" * 40
    add_to_hub_cache(hub, "org/tiny", other, second, ref="v2")
    assert resolve_model("org/tiny", revision="v2").commit == second
    assert resolve_model("org/tiny", revision=COMMIT).commit == COMMIT
    assert resolve_model("org/tiny").commit == COMMIT


def test_offline_with_nothing_cached_is_one_clear_message(hub):
    with pytest.raises(QdoraError, match=r"org/absent is not in the Hub cache and the Hub cannot be reached"):
        resolve_model("org/absent")


def test_revision_on_a_local_folder_is_refused(tiny):
    with pytest.raises(QdoraError, match="applies to Hub models"):
        resolve_model(str(tiny), revision="main")


def test_a_path_that_is_not_a_repo_id_is_a_missing_folder(hub):
    with pytest.raises(QdoraError, match="no such folder"):
        resolve_model("./nowhere/model")


@pytest.fixture
def online(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def point(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)

    return point


def test_gated_repo_is_one_clear_message(online):
    with refusing_hub(403, "GatedRepo", "Access to model org/gated is restricted.") as endpoint:
        online(endpoint)
        with pytest.raises(QdoraError, match=r"org/gated is a gated repository: accept its licence") as e:
            resolve_model("org/gated")
    from huggingface_hub.errors import GatedRepoError

    assert isinstance(e.value.__cause__, GatedRepoError)  # raised by huggingface_hub itself


def test_missing_repo_is_one_clear_message(online):
    with refusing_hub(404, "RepoNotFound", "Repository not found") as endpoint:
        online(endpoint)
        with pytest.raises(QdoraError, match=r"org/nope: no such model on the Hub, or it is private"):
            resolve_model("org/nope")


def test_no_network_with_nothing_cached_is_one_clear_message(online):
    online(closed_port_endpoint())
    with pytest.raises(QdoraError, match=r"org/tiny is not in the Hub cache and the Hub cannot be reached"):
        resolve_model("org/tiny")


def test_no_network_uses_the_cache(online, hub, tiny):
    add_to_hub_cache(hub, "org/tiny", tiny, COMMIT)
    online(closed_port_endpoint())
    assert resolve_model("org/tiny").commit == COMMIT


@pytest.mark.slow
def test_cli_honours_hf_home_and_hf_hub_offline(tmp_path, tiny):
    """The environment variables themselves, in a fresh process: `qdora plan --model org/tiny`."""
    home = tmp_path / "hf"
    add_to_hub_cache(home / "hub", "org/tiny", tiny, COMMIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-m", "qdora.cli", "plan", "--model", "org/tiny", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    missing = subprocess.run([sys.executable, "-m", "qdora.cli", "plan", "--model", "org/absent"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert "org/absent is not in the Hub cache" in missing.stderr and "Traceback" not in missing.stderr
