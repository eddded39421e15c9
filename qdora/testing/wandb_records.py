"""Read back what wandb wrote to an offline run folder (`OUTPUT/wandb/offline-run-*/run-<id>.wandb`).

A `.wandb` file is wandb's transaction log: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then
records in 32 KiB blocks, each record split into chunks with a 7-byte header (CRC-32 of type byte and
data, length, type FULL/FIRST/MIDDLE/LAST) as in LevelDB's log format. Each record is a protobuf
`wandb.proto.wandb_internal_pb2.Record` (wandb's own message type). This is the file `wandb sync`
uploads; recent wandb versions no longer ship a Python reader for it, so tests read it here, checking
every checksum, and parse the records with wandb's protobuf classes.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list:
    """Every Record of a `.wandb` file, in order; ValueError on a bad header or checksum."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a wandb transaction log (header {data[:HEADER]!r})")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block / file
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@dataclass
class OfflineRun:
    """The parts of an offline run tests look at."""

    run_id: str
    project: str
    name: str
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per logged step, with "_step"
    exit_code: int | None = None


def read_offline_run(run_file: str | Path) -> OfflineRun:
    """Run metadata, config, history rows and exit code from one `run-<id>.wandb` file."""
    run = OfflineRun("", "", "")
    for record in read_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.name = r.run_id, r.project, r.display_name
            run.config.update({item.key: json.loads(item.value_json) for item in r.config.update})
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            run.history.append(row)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_run_files(output: str | Path) -> list[Path]:
    """The `.wandb` files of every offline run under OUTPUT/wandb."""
    return sorted(Path(output).glob("wandb/offline-run-*/run-*.wandb"))
