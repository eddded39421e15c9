"""Stream a Hugging Face safetensors checkpoint tensor by tensor, and write one in shards as it goes.

Merging a 70B model must not hold 140 GB: `WeightReader` opens each file with `safe_open` (memory
mapped) and hands out one tensor at a time; `ShardedWriter` keeps at most one output shard in memory
and flushes it, then names the shards `model-0000i-of-0000N.safetensors` and writes the index at the
end (a single shard is `model.safetensors`, as `save_pretrained` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qdora.errors import QdoraError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes (decimal units as transformers' max_shard_size; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise QdoraError(f"invalid size {text!r}: write e.g. 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def is_model_dir(path: str | Path) -> bool:
    """A local HF model folder with safetensors weights."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


class WeightReader:
    """The tensors of a safetensors checkpoint, read lazily: `model.safetensors.index.json` names the shards;
    without an index, `model.safetensors` or else every `*.safetensors` file of the folder."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if (self.dir / INDEX).is_file():
            try:
                weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise QdoraError(f"{self.dir / INDEX} is not a safetensors index: {e}") from e
            self.files = {k: self.dir / f for k, f in weight_map.items()}
        else:
            # model.safetensors, or a set of shards without an index: every *.safetensors file's keys
            paths = [self.dir / SINGLE] if (self.dir / SINGLE).is_file() else sorted(self.dir.glob("*.safetensors"))
            if not paths:
                raise QdoraError(f"{self.dir} has no *.safetensors weights: only safetensors checkpoints are read")
            self.files = {}
            for path in paths:
                with safe_open(str(path), framework="pt") as f:
                    for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        if k in self.files:
                            raise QdoraError(f"{self.dir}: tensor {k} is in both {self.files[k].name} and {path.name}")
                        self.files[k] = path
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise QdoraError(f"{self.dir}: shard files named in the index are missing: {missing[:3]}")

    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard), so each file is read front to back."""
        order = {p: i for i, p in enumerate(dict.fromkeys(self.files.values()))}
        return sorted(self.files, key=lambda k: order[self.files[k]])

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        """One tensor, copied out of the memory map (so the map can be closed)."""
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self.files[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, safetensors dtype such as "BF16"), from the file headers only (no tensor data)."""
        out = {}
        for path in dict.fromkeys(self.files.values()):
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if self.files.get(k) == path:
                        s = f.get_slice(k)
                        out[k] = (tuple(s.get_shape()), s.get_dtype())
        return out

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time. Each tensor gets its own short-lived memory map: a map held open
        across a whole shard keeps every page read so far resident (RSS grows to the shard's size)."""
        for k in self.keys():
            yield k, self.get(k)


class ShardedWriter:
    """Accumulate tensors up to `shard_bytes`, flush each shard to disk, write the index on `close`."""

    def __init__(self, out_dir: Path, shard_bytes: int):
        self.dir, self.shard_bytes = Path(out_dir), shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.dir / f".shard-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush the last shard, give the shards their final names, write the index if there are several."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            final = self.dir / SINGLE
            self.shards[0][0].rename(final)
            return [final]
        weight_map, paths = {}, []
        for i, (path, names) in enumerate(self.shards, start=1):
            final = self.dir / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            paths.append(final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return paths
