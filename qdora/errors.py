"""One exception type for every user-facing error, so the CLI can print one clean message; and the
note of what qdora was doing, for the errors that are not the user's (bugs), so their report says it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress


class QdoraError(Exception):
    """A problem with the user's input or environment, explained in the message."""


@contextmanager
def doing(what: str) -> Iterator[None]:
    """Label an exception escaping this block with `what` (the innermost label wins): the CLI prints it
    under the traceback of an unexpected error, e.g. "while writing tensor blk.3.attn_q.weight"."""
    try:
        yield
    except BaseException as e:
        if not hasattr(e, "qdora_doing"):
            with suppress(AttributeError):  # a few built-in exceptions take no attributes
                e.qdora_doing = what
        raise
