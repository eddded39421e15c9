"""One `qdora train` per output folder: an exclusive lock on `OUTPUT/.qdora-run.lock` for the whole run.

Two runs pointed at the same --output (a second terminal, a scheduler retry) would interleave checkpoints
and metrics. The lock is an `fcntl.flock` on a file holding the owner's pid and host: the kernel drops it
when the process ends in any way (even SIGKILL), so it is never left held by a dead run. A run that ended
cleanly removes the file; a file left by a crashed run is a *stale* lock: it is reported (whose it was)
and taken over. Only global rank 0 takes the lock (multi-node runs share OUTPUT through a filesystem; the
other ranks follow rank 0's verdict). flock works across processes of one host and on most shared
filesystems (NFSv4, Lustre, GPFS, CephFS); the pid and host in the message help where it does not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from qdora.errors import QdoraError

LOCK_NAME = ".qdora-run.lock"
log = logging.getLogger("qdora.train.run_lock")


def _describe(record: dict) -> str:
    started = record.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else ""
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}{when}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "host": "?"}
    return record if isinstance(record, dict) else {}


def _in_use(out: Path, record: dict) -> QdoraError:
    return QdoraError(f"{out} is in use by another qdora train run ({_describe(record)}): two runs in one folder "
                      "would interleave checkpoints and metrics; wait for it to end, or choose another --output")


def check_free(out: str | Path) -> None:
    """Refuse early (before any work, writing nothing) when a live run holds OUTPUT's lock."""
    path = Path(out) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _in_use(Path(out), _read(fd)) from None
        raise
    finally:
        os.close(fd)


class RunLock:
    """The lock of one run on OUTPUT (created if missing); `release` on any exit. With `enabled=False`
    (ranks other than 0) it does nothing."""

    def __init__(self, out: str | Path, enabled: bool = True):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.enabled = enabled
        self.fd: int | None = None
        self.created_out = False
        self.stale: dict | None = None  # the record of a crashed run whose lock was taken over

    def acquire(self) -> RunLock:
        if not self.enabled:
            return self
        self.created_out = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        tries = 20  # `check_free` of another starting run holds a shared lock for microseconds: retry briefly
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                record = _read(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise QdoraError(f"cannot lock {self.path}: {e.strerror}") from e
                tries -= 1
                if tries == 0:
                    raise _in_use(self.out, record) from None
                time.sleep(0.05)
                continue
            try:  # the holder before us may have removed the file while we waited: lock the one in place
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        previous = _read(fd)
        if previous:
            self.stale = previous
            log.warning("qdora: %s holds a stale run lock of %s, which ended without releasing it (crashed or "
                        "killed); taking it over", self.out, _describe(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        return self

    def release(self) -> None:
        """Remove the lock file and unlock; a folder this run created and left empty is removed too."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding the lock: no one can take a half-removed one
        os.close(self.fd)
        self.fd = None
        if self.created_out:
            with contextlib.suppress(OSError):  # only if empty: a run refused in setup leaves nothing behind
                self.out.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
