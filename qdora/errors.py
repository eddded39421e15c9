"""One exception type for every user-facing error, so the CLI can print one clean message."""


class QdoraError(Exception):
    """A problem with the user's input or environment, explained in the message."""
