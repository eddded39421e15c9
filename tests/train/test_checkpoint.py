"""Checkpoints are safetensors + JSON: resuming never unpickles, a planted pickle is refused without running,
and the RNG/optimizer states survive the round trip exactly."""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qdora.errors import QdoraError
from qdora.testing.runs import alpaca_data, small_config
from qdora.train.checkpoint import _read_optimizer, _write_optimizer
from qdora.train.distributed import load_optimizer_state, optimizer_state
from qdora.train.loop import train
from qdora.train.rng_state import rng_state, set_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this creates the folder `marker`: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _pickled(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def test_the_payload_runs_when_unpickled(tmp_path):
    """The refusal tests below would be empty if the payload did nothing: show that it acts."""
    pickle.loads(_pickled(tmp_path / "ran"))
    assert (tmp_path / "ran").is_dir()


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A real 1-step checkpoint of a tiny run (and the data it trained on)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    data = alpaca_data(tmp)
    train(small_config(tiny_llama_dir, data, tmp / "run", max_steps=2, save_every=1, keep=0))
    return tmp / "run" / "checkpoint-1", data


PLANTS = {
    # file replaced by a malicious pickle: what a shared disk or a colleague's run could hold
    "optimizer.safetensors": "not a safetensors file",
    "trainer_state.json": "not JSON",
    "optimizer.json": "not JSON",
    "rng_state_0.json": "not JSON",
    "adapter_model.safetensors": "cannot read .* as safetensors",
}


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_resume_refuses_a_planted_pickle_without_running_it(tiny_llama_dir, checkpoint_dir, tmp_path, name):
    ckpt, data = checkpoint_dir
    planted = shutil.copytree(ckpt, tmp_path / "checkpoint-1")
    marker = tmp_path / "payload-ran"
    (planted / name).write_bytes(_pickled(marker))
    out = tmp_path / "resumed"
    with pytest.raises(QdoraError, match=PLANTS[name]):
        train(small_config(tiny_llama_dir, data, out, resume=str(planted), max_steps=2))
    assert not marker.exists(), "the pickle was unpickled"
    assert not out.exists(), "a refused resume wrote something"


def test_a_checkpoint_of_pickle_files_is_refused(tiny_llama_dir, checkpoint_dir, tmp_path):
    """qdora 0.1's layout (optimizer.pt, trainer_state.pt, rng_state_0.pt: torch.save pickles)."""
    _, data = checkpoint_dir
    old = tmp_path / "checkpoint-1"
    old.mkdir()
    marker = tmp_path / "payload-ran"
    for name in ("optimizer.pt", "trainer_state.pt", "rng_state_0.pt"):
        torch.save(_Payload(marker), old / name)
    with pytest.raises(QdoraError, match="pickle files .* no longer reads pickles"):
        train(small_config(tiny_llama_dir, data, tmp_path / "resumed", resume=str(old), max_steps=2))
    assert not marker.exists()


def test_a_bin_adapter_is_refused(tmp_path):
    from qdora.core.adapter_io import load_adapter_tensors

    marker = tmp_path / "payload-ran"
    torch.save(_Payload(marker), tmp_path / "adapter_model.bin")
    with pytest.raises(QdoraError, match="adapter_model.bin, a pickle file"):
        load_adapter_tensors(tmp_path)
    assert not marker.exists()


def test_checkpoint_holds_no_pickle(checkpoint_dir):
    ckpt, _ = checkpoint_dir
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "qdora_adapter.json", "rng_state_0.json", "trainer_state.json"]


def test_rng_state_round_trips_through_json(tmp_path):
    import json

    random.random(), np.random.rand(), torch.rand(1)
    np.random.standard_normal()  # numpy's cached gaussian is part of its state
    saved = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.random(), np.random.rand(5), torch.rand(7)
    set_rng_state(saved)
    again = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _write_optimizer(tmp_path, optimizer_state(model, opt))
    fresh = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95))
    load_optimizer_state(model, fresh, _read_optimizer(tmp_path))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key, value in a["state"][i].items():
            assert torch.equal(b["state"][i][key], value), (i, key)
    assert [g["lr"] for g in b["param_groups"]] == [g["lr"] for g in a["param_groups"]]
    assert tuple(b["param_groups"][0]["betas"]) == (0.8, 0.95)
