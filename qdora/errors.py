"""The one exception qdora raises for user-facing problems (bad input, missing tools).

The CLI turns it into a clean one-line error with exit code 1; anything else is a bug and keeps its traceback.
"""


class QdoraError(Exception):
    """A problem the user can fix: the message says what was found and what to do."""
