"""Shared fixtures: tiny local models (no hub), deterministic seeds, thread caps, CUDA marker handling."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama written once per session (fp32 weights, local BPE tokenizer)."""
    from qdora.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", family="llama", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of in-process training (2 shared cores: oversubscription makes
    steps 4x slower); the previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _mount(args: list[str]) -> bool:
    """Run mount/umount as root, or through passwordless sudo; False when neither is possible."""
    import subprocess

    cmd = args if os.geteuid() == 0 else ["sudo", "-n", *args]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(nbytes)` -> a folder on a real tmpfs of that size: writes beyond it fail with ENOSPC, as
    on a full disk; `small_disk.resize(folder, nbytes)` grows it. Needs root or passwordless sudo (CI has
    it); skipped where neither exists."""
    mounts: list[Path] = []

    def make(nbytes: int, name: str = "disk") -> Path:
        path = tmp_path / name
        path.mkdir()
        if not _mount(["mount", "-t", "tmpfs", "-o", f"size={nbytes},uid={os.getuid()},gid={os.getgid()}",
                       "tmpfs", str(path)]):
            pytest.skip("a small tmpfs needs root or passwordless sudo")
        mounts.append(path)
        return path

    def resize(path: Path, nbytes: int) -> None:
        """Give the disk more room (a user freeing space), keeping its files."""
        assert _mount(["mount", "-o", f"remount,size={nbytes}", str(path)])

    make.resize = resize
    yield make
    import gc

    gc.collect()  # a failed run's traceback may still hold a file open on the disk
    for path in mounts:
        _mount(["umount", str(path)]) or _mount(["umount", "-l", str(path)])


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write into: a read-only tmpfs when we are root (root ignores permission
    bits), else a folder with mode 0555. Returns (folder, the words the error should use)."""
    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() == 0:
        if not _mount(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]):
            pytest.skip("cannot mount a read-only tmpfs")
        yield path, "read-only"
        _mount(["umount", str(path)]) or _mount(["umount", "-l", str(path)])
    else:
        path.chmod(0o555)
        yield path, "permission denied"
        path.chmod(0o755)
