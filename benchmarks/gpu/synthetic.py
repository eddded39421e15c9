"""A model folder without weights, and a weight source that makes them on the device: 70B without 140 GB.

A 70B checkpoint does not fit the GPU machine's disk (140 GB in bf16 against 64 GB), and reading one would
take longer than a 10-minute command. The folder holds the preset's config.json and a tiny local
tokenizer (token ids are valid for any vocabulary at least as large); `RandomWeights` stands in for the
safetensors reader and returns each tensor, generated on the device from a seed and its name, in the
checkpoint's order. So `qdora train` runs its real path (validation, meta build, FSDP2 sharding,
streaming quantization, training loop, checkpointing) on a 70B-shaped model whose weights exist only one
tensor at a time.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import torch


def write_model_dir(path: Path, shape: str) -> Path:
    """config.json of a preset shape plus the tiny llama3-style tokenizer; no weights."""
    from qdora.testing.tiny_tokenizers import build_tokenizer
    from qdora.tools.presets import preset_config

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer("llama3")
    config = preset_config(shape)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_text_data(path: Path, rows: int = 4000) -> Path:
    """Enough packed text for a few steps at seq 2048 on two ranks (the tokenizer is tiny: ~25 tokens/row)."""
    import json

    from qdora.testing.demo_data import demo_corpus

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo_corpus(rows)))
    return path


class RandomWeights:
    """The WeightReader interface (keys, get, shape, __contains__) over seeded random tensors on `device`.

    Decoder linears come as fp32 (qdora quantizes them to NF4 at once), the rest in bf16; norms are ones.
    Every rank makes the same tensor for the same name, as every rank reads the same file.
    """

    def __init__(self, model_dir: str | Path, device: torch.device, seed: int = 0):
        from qdora.core.load import meta_model

        self.device, self.seed = torch.device(device), seed
        self._shapes = {k: tuple(v.shape) for k, v in meta_model(model_dir, torch.bfloat16).state_dict().items()}
        self.dir = Path(model_dir)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        shape = self._shapes[key]
        if "norm" in key:
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        linear = len(shape) == 2 and ".layers." in key
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        if linear:  # quantized at once: fp32, one linear at a time (0.9 GiB at most at 70B)
            return torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32).mul_(0.02)
        # embeddings / lm_head (128256 x 8192 at 70B): made in bf16, a slab of rows at a time, so no fp32
        # copy of the whole table (4 GiB) lands on a capped GPU beside the loaded shards
        out = torch.empty(shape, dtype=torch.bfloat16, device=self.device)
        flat = out.view(shape[0], -1) if out.dim() > 1 else out.view(-1, 1)
        for start in range(0, flat.shape[0], 8192):
            rows = flat[start:start + 8192]
            rows.copy_(torch.randn(rows.shape, generator=gen, device=self.device, dtype=torch.float32).mul_(0.02))
        return out

    def items(self):
        for k in self.keys():
            yield k, self.get(k)


def use_random_weights(device: torch.device, seed: int = 0) -> None:
    """Make every loaded qdora module open RandomWeights where it would open the safetensors checkpoint."""
    import qdora.core.load as load

    original = load.open_checkpoint

    def open_random(model_dir):
        if not (Path(model_dir) / "config.json").is_file():
            return original(model_dir)  # the same refusal as for a real folder
        return RandomWeights(model_dir, device, seed)

    for name, mod in list(sys.modules.items()):
        if name.startswith("qdora") and getattr(mod, "open_checkpoint", None) is original:
            mod.open_checkpoint = open_random
