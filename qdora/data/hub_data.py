"""Data by name (`--data org/dataset`) or from a local folder laid out as a dataset repository.

Both go through `datasets`' own builder (`load_dataset_builder` → `download_and_prepare` → `as_dataset`,
what `load_dataset` does), so a folder with a dataset card (`README.md` whose YAML header declares
`configs:`) or a `data/` folder of split files (`data/train-*.parquet`, `data/test.jsonl`, ...) behaves
exactly like its Hub copy: `--data-config` picks the config, `--data-split` the split, `--data-revision`
the branch/tag/commit. The Hub commit the files came from is returned so that the run records it.
`HF_HOME`, `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` act as in every HF tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qdora.errors import QdoraError

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class RepoSelect:
    """Which part of a dataset repository to read."""

    split: str = "train"
    config: str | None = None
    revision: str | None = None


def is_dataset_repo_dir(path: Path) -> bool:
    """A local folder laid out as a dataset repository: a dataset card with a YAML header, or a data/ folder."""
    if not path.is_dir():
        return False
    card = path / "README.md"
    if card.is_file() and card.read_text(encoding="utf-8", errors="replace").startswith("---"):
        return True
    return (path / "data").is_dir()


def load_repo(path: str, select: RepoSelect):
    """(rows, commit) of one split of a Hub dataset or a repository-laid-out folder; QdoraError on failure."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    local = Path(path).is_dir()
    if local and select.revision:
        raise QdoraError(f"--data-revision {select.revision} applies to Hub datasets, but {path} is a local folder")
    try:
        builder = datasets.load_dataset_builder(path, name=select.config, revision=select.revision)
    except DatasetNotFoundError as e:
        raise QdoraError(_not_found(path, str(e))) from e
    except ConnectionError as e:
        raise QdoraError(f"dataset {path} is not in the datasets cache and the Hub cannot be reached (offline, or "
                         f"HF_HUB_OFFLINE=1): load it once with network access, or pass a local file") from e
    except ValueError as e:  # unknown config name: datasets lists the available ones
        raise QdoraError(f"dataset {path}: {_first_line(e)}") from e
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
        raise QdoraError(f"dataset {path}: no data files found ({_first_line(e)})") from e
    splits = list((builder.info.splits or {}).keys()) or _declared_splits(builder)
    if splits and select.split not in splits:
        raise QdoraError(f"dataset {path} has no split {select.split!r}: it has {', '.join(splits)} "
                         "(choose with --data-split / --eval-split)")
    try:
        builder.download_and_prepare()
        rows = builder.as_dataset(split=select.split)
    except (ValueError, KeyError) as e:
        raise QdoraError(f"dataset {path}: cannot read split {select.split!r}: {_first_line(e)}") from e
    except Exception as e:  # pyarrow/datasets raise many types; the user needs the dataset and the cause
        raise QdoraError(f"dataset {path} could not be read ({type(e).__name__}: {_first_line(e)})") from e
    commit = None if local else builder.hash if _COMMIT.match(str(builder.hash)) else None
    return rows, commit


def _declared_splits(builder) -> list[str]:
    files = getattr(builder.config, "data_files", None) or {}
    return list(files.keys())


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _not_found(path: str, detail: str) -> str:
    if "gated" in detail:
        return (f"dataset {path} is gated: accept its terms on its Hub page, then log in (`hf auth login`) or set "
                "HF_TOKEN to a token of that account")
    if "Revision" in detail:
        return f"dataset {path}: {detail}"
    return f"dataset {path}: no such local path, and no such dataset on the Hub (or it is private: set HF_TOKEN)"
