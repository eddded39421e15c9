"""User-facing errors: the CLI catches QdoraError and prints its message without a traceback."""


class QdoraError(Exception):
    """An error caused by the user's input or setup, with a message that says what to fix."""
