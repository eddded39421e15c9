"""A `qdora train` that dies (SIGKILL: no cleanup, no finally) at one step of writing a checkpoint.

    python -m qdora.testing.crash_worker POINT N MODEL DATA OUTPUT OPTIONS_JSON

POINT is where the N-th checkpoint write dies: `before_files` (its temporary folder exists, empty),
`between_files` (the adapter is written, the optimizer state is not) or `before_rename` (every file is
written, the folder is not yet renamed into place). The run is `qdora.testing.runs.small_config(MODEL, DATA,
OUTPUT, **OPTIONS)`. The crash tests then resume with `--resume latest` and compare losses with an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from qdora.train import checkpoint

POINTS = {"before_files": "_write_adapter", "between_files": "_write_optimizer", "before_rename": "_publish"}


def crash_at(point: str, nth: int) -> None:
    """Make the `nth` call of the checkpoint step `point` kill this process before it runs."""
    name = POINTS[point]
    original = getattr(checkpoint, name)
    calls = 0

    def dying(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(checkpoint, name, dying)


def main(argv: list[str]) -> None:
    point, nth, model, data, output, options = argv
    crash_at(point, int(nth))
    from qdora.testing.runs import small_config
    from qdora.train.loop import train

    train(small_config(Path(model), Path(data), Path(output), **json.loads(options)))


if __name__ == "__main__":
    main(sys.argv[1:])
