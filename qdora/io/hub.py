"""A model by Hub name (`meta-llama/Llama-3.1-8B`) or by folder: where its files are, and which commit they are.

A local folder always wins. Otherwise the name goes to `huggingface_hub.snapshot_download`, which fetches
only what qdora reads (config, tokenizer files, safetensors and their index; never `.bin`/`.pth`/`.gguf`
copies or `original/` folders) into the Hub cache and honours `HF_HOME`/`HF_HUB_CACHE`, `HF_TOKEN`,
`HF_ENDPOINT` and `HF_HUB_OFFLINE` as every HF tool does. The resolved commit is returned so that a run
records exactly which weights it trained on.

Errors become one QdoraError each: no such repository (or no access), a gated repository without an
accepted licence/token, an unknown revision, and no network (or `HF_HUB_OFFLINE=1`) with nothing cached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qdora.errors import QdoraError

MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
]
CONFIG_FILES = ["config.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are, and what they are: a Hub repo at a commit, or a local folder."""

    path: Path
    repo_id: str | None = None  # None for a local folder
    commit: str | None = None  # the Hub commit the files come from

    @property
    def name(self) -> str:
        """What to record as the base model: the repo id (as PEFT records it) or the folder's absolute path."""
        return self.repo_id or str(self.path.resolve())

    def record(self) -> dict:
        """For train_config.yaml and the adapter's metadata."""
        return {"name": self.name, "revision": self.commit}


def looks_like_repo_id(name: str) -> bool:
    """`org/name` or `name` as the Hub spells repository ids (not a path: no leading ./, ../, / or ~)."""
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "~")) and name.count("/") <= 1


def names_org_repo(name: str) -> bool:
    """`org/name`: what qdora takes for a Hub id where a bare `name` more likely means a missing local path."""
    return "/" in name and looks_like_repo_id(name)


def resolve_model(name: str | Path, revision: str | None = None, config_only: bool = False) -> ResolvedModel:
    """The local folder `name`, or the snapshot of Hub repo `name` at `revision` (default: main).

    `config_only` fetches config.json alone (for `qdora plan`). Raises QdoraError with one clear message.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if revision:
            raise QdoraError(f"--revision {revision} applies to Hub models, but {text} is a local folder")
        if not path.is_dir():
            raise QdoraError(f"--model {text} is a file, not a model folder")
        return ResolvedModel(path)
    if not looks_like_repo_id(text):
        raise QdoraError(f"--model {text}: no such folder (and not a Hub repository id like org/name)")
    folder = _download(text, revision, CONFIG_FILES if config_only else MODEL_FILES)
    return ResolvedModel(folder, text, folder.name if _COMMIT.match(folder.name) else None)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download with huggingface_hub's own errors turned into one message each."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError as e:  # a subclass of RepositoryNotFoundError: test it first
        raise QdoraError(f"{repo_id} is a gated repository: accept its licence on its Hub page, then log in "
                         "(`hf auth login`) or set HF_TOKEN to a token of that account") from e
    except RevisionNotFoundError as e:
        raise QdoraError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit)") from e
    except RepositoryNotFoundError as e:
        raise QdoraError(f"{repo_id}: no such model on the Hub, or it is private and HF_TOKEN gives no access "
                         "(a local folder of that name does not exist either)") from e
    except IncompleteSnapshotError as e:
        raise QdoraError(f"the cached copy of {repo_id}{at} is incomplete and the Hub cannot be reached: "
                         f"{str(e).splitlines()[0]}") from e
    except LocalEntryNotFoundError as e:
        raise QdoraError(f"{repo_id}{at} is not in the Hub cache and the Hub cannot be reached "
                         f"(offline, or HF_HUB_OFFLINE=1): download it once with network access, or pass a "
                         f"local folder") from e
    except HFValidationError as e:
        raise QdoraError(f"{repo_id} is not a valid Hub repository id: {e}") from e
    except HfHubHTTPError as e:
        raise QdoraError(f"the Hub refused {repo_id}{at}: {str(e).splitlines()[0]}") from e
    except OSError as e:  # disk full, permissions of the cache folder
        raise QdoraError(f"cannot download {repo_id}{at} into the Hub cache: {e}") from e
