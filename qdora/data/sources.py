"""Read training records from local files with `datasets`, keeping each file's identity.

Every source file is loaded on its own (not concatenated) so that a malformed record can be reported
by file name and row: the 1-based line for JSONL, the 1-based record otherwise.
Local files use only datasets' packaged local builders (no network). A Hub dataset name (`org/dataset`)
or a local folder laid out as a dataset repository goes through `qdora.data.hub_data` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qdora.data.hub_data import RepoSelect, is_dataset_repo_dir, load_repo
from qdora.errors import QdoraError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
TXT_MODES = ("line", "file")


@dataclass
class Source:
    """One loaded file (or save_to_disk folder): its rows and how to name row i in an error."""

    name: str
    rows: object  # datasets.Dataset
    locate: Callable[[int], str]
    revision: str | None = None  # the Hub commit a dataset repository was read at

    def where(self, i: int) -> str:
        return f"{self.name}, {self.locate(i)}"


def _datasets():
    """The datasets module, with its download-count ping to the Hub switched off.

    `load_dataset("json", ...)` on a local file otherwise sends a HEAD request to the Hub's S3 bucket
    (datasets.load.increase_load_count, 3 s timeout): a network access and, offline, a multi-second stall.
    """
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _jsonl_line_numbers(path: Path) -> list[int]:
    """1-based line numbers of the non-blank lines: datasets skips blank lines, so row i is line[i]."""
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def _diagnose_jsonl(path: Path) -> str | None:
    """Why datasets could not read a JSONL file: the first bad line, or the first field whose type changes."""
    first_type: dict[str, tuple[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}: invalid JSON ({e.msg})"
            if not isinstance(record, dict):
                return f"line {n}: expected a JSON object, got {type(record).__name__}"
            for key, value in record.items():
                kind = type(value).__name__
                if value is None:
                    continue
                seen = first_type.setdefault(key, (kind, n))
                if seen[0] != kind:
                    return f"line {n}: field {key!r} is {kind}, but {seen[0]} on line {seen[1]}"
    return None


def _csv_as_text(rows):
    """CSV cells are text: pandas' guess that a column of answers like 42 is numeric would refuse them."""
    import datasets

    if all(getattr(f, "dtype", None) in ("string", "large_string") for f in rows.features.values()):
        return rows
    return rows.cast(datasets.Features({c: datasets.Value("string") for c in rows.column_names}))


def _load_file(path: Path, txt_mode: str) -> Source:
    datasets = _datasets()

    suffix = path.suffix.lower()
    builder = BUILDERS[suffix]
    kwargs = {"sample_by": "line" if txt_mode == "line" else "document"} if builder == "text" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets/pyarrow raise many types; the user needs the file name and the cause
        detail = _diagnose_jsonl(path) if suffix == ".jsonl" else None
        if detail:
            raise QdoraError(f"{path}, {detail}") from e
        raise QdoraError(f"{path}: could not be read ({type(e).__name__}: {e})") from e
    if builder == "csv":
        rows = _csv_as_text(rows)
    if suffix == ".jsonl":
        lines = _jsonl_line_numbers(path)
        return Source(str(path), rows, lambda i: f"line {lines[i]}")
    if suffix == ".txt" and txt_mode == "line":
        return Source(str(path), rows, lambda i: f"line {i + 1}")
    return Source(str(path), rows, lambda i: f"row {i + 1}")


def _load_saved(path: Path) -> Source:
    datasets = _datasets()

    try:
        rows = datasets.load_from_disk(str(path))
    except Exception as e:
        raise QdoraError(f"{path}: could not be loaded as a datasets save_to_disk folder ({e})") from e
    if isinstance(rows, datasets.DatasetDict):
        if "train" not in rows:
            raise QdoraError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(rows)})")
        rows = rows["train"]
    return Source(str(path), rows, lambda i: f"row {i + 1}")


def _load_repo(path: str, select: RepoSelect | None) -> Source:
    rows, commit = load_repo(path, select or RepoSelect())
    split = (select or RepoSelect()).split
    return Source(f"{path} [{split}]", rows, lambda i: f"row {i + 1}", commit)


def load_sources(path: str | Path, txt_mode: str = "line", select: RepoSelect | None = None) -> list[Source]:
    """Load a data file, a save_to_disk folder, or a folder of those (sorted by name, not recursive); or
    one split of a Hub dataset `org/name` / a local folder laid out as a dataset repository (`select`).

    `txt_mode`: for `.txt` files, "line" makes every non-empty line a document, "file" the whole file.
    """
    from qdora.io.hub import names_org_repo

    if txt_mode not in TXT_MODES:
        raise QdoraError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    p = Path(path).expanduser()
    if is_dataset_repo_dir(p) or not p.exists() and names_org_repo(str(path)):
        return [_load_repo(str(path) if not p.exists() else str(p), select)]
    if not p.exists():
        raise QdoraError(f"dataset path not found: {p}")
    if _is_saved_dataset(p):
        return [_load_saved(p)]
    if p.is_file():
        if p.suffix.lower() not in BUILDERS:
            raise QdoraError(f"{p}: unsupported file type {p.suffix!r}; accepted: {', '.join(BUILDERS)}")
        return [_load_file(p, txt_mode)]
    entries = sorted(p.iterdir())
    sources = [
        _load_saved(e) if _is_saved_dataset(e) else _load_file(e, txt_mode)
        for e in entries
        if _is_saved_dataset(e) or (e.is_file() and e.suffix.lower() in BUILDERS)
    ]
    if not sources:
        raise QdoraError(
            f"{p}: no data files found (accepted: {', '.join(BUILDERS)} files or save_to_disk folders)"
        )
    return sources
