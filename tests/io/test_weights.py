"""Streaming safetensors I/O: sizes, sharded writing with HF's names and index, reading it back."""

from __future__ import annotations

import json

import pytest
import torch

from qdora.errors import QdoraError
from qdora.io.weights import ShardedWriter, WeightReader, parse_size


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("1GiB") == 2**30
    assert parse_size("1.5kb") == 1500 and parse_size(123) == 123
    for bad in ("", "GB", "2XB", "-1GB", "0MB"):
        with pytest.raises(QdoraError, match="invalid size"):
            parse_size(bad)


def test_writer_shards_and_reader_round_trip(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(7)}  # 400 bytes each
    writer = ShardedWriter(tmp_path, shard_bytes=1000)
    for k, t in tensors.items():
        writer.add(k, t)
    paths = writer.close()
    assert [p.name for p in paths] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2800 and index["weight_map"]["t2"] == paths[1].name
    reader = WeightReader(tmp_path)
    assert reader.keys() == list(tensors) and reader.shape("t3") == (100,)
    for k, t in reader.items():
        assert torch.equal(t, tensors[k])
    assert not list(tmp_path.glob(".*"))


def test_single_shard_is_model_safetensors(tmp_path):
    writer = ShardedWriter(tmp_path, shard_bytes=10**6)
    writer.add("a", torch.zeros(3))
    assert [p.name for p in writer.close()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert WeightReader(tmp_path).keys() == ["a"]


def test_reader_errors(tmp_path):
    with pytest.raises(QdoraError, match="only safetensors"):
        WeightReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(QdoraError, match="missing"):
        WeightReader(tmp_path)
