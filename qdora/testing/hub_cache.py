"""A Hugging Face Hub cache written on disk the way `huggingface_hub` writes it, and a loopback stand-in Hub.

`add_to_hub_cache` lays a repository out as `snapshot_download` leaves it: `models--org--name/blobs/<id>`
(git blob sha1 for small files, sha256 for LFS files such as safetensors), `snapshots/<commit>/<file>`
as relative symlinks into `blobs/`, and `refs/<branch>` holding the commit. With `HF_HUB_OFFLINE=1`,
huggingface_hub's own `snapshot_download` then resolves names from it, so tests use the real library.

`refusing_hub` serves HTTP on 127.0.0.1 and answers every request with the status and `X-Error-Code`
header the Hub uses (e.g. 403 GatedRepo, 404 RepoNotFound): pointed at by `HF_ENDPOINT`, it makes
huggingface_hub raise its own GatedRepoError / RepositoryNotFoundError, as the real Hub would.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".gguf", ".parquet")


def _blob_id(name: str, data: bytes) -> str:
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_folder(cache_dir: str | Path, repo_id: str, repo_type: str = "model") -> Path:
    return Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def add_to_hub_cache(
    cache_dir: str | Path,
    repo_id: str,
    source_dir: str | Path,
    commit: str | None = None,
    ref: str = "main",
    repo_type: str = "model",
) -> Path:
    """Put every file under `source_dir` into the cache as commit `commit` of `repo_id`; returns the snapshot.

    The commit defaults to a hash of the files (40 hex digits, like a git commit id).
    """
    src = Path(source_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if commit is None:
        h = hashlib.sha1()
        for p in files:
            h.update(str(p.relative_to(src)).encode() + p.read_bytes())
        commit = h.hexdigest()
    repo = repo_folder(cache_dir, repo_id, repo_type)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for p in files:
        rel = p.relative_to(src)
        data = p.read_bytes()
        blob = repo / "blobs" / _blob_id(p.name, data)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return snapshot


@contextmanager
def refusing_hub(status: int, error_code: str, message: str = "refused") -> Iterator[str]:
    """A loopback HTTP server answering every request with `status` and `X-Error-Code: error_code`.

    Yields its endpoint URL (for HF_ENDPOINT / huggingface_hub.constants.ENDPOINT); stops on exit.
    """

    class Refuse(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = f'{{"error": "{message}"}}'.encode()
            self.send_response(status)
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, *args) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_endpoint() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: a connection attempt fails at once (no network)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
