"""How the command line reports an expected error: one line, once."""
from __future__ import annotations

import os
import sys

from ..utils.errors import RunRefused

# Errors of the input or the state (one line, exit code 2); anything else is a bug (a traceback).
EXPECTED = (ValueError, FileExistsError, FileNotFoundError, RunRefused)


def report(command: str, error: BaseException) -> None:
    """The one-line report of an expected error, once: under torchrun every
    rank meets the same bad input and rank 0 speaks. A report made early
    (before the process group's teardown, while torchrun cannot yet stop
    rank 0) is not repeated."""
    if getattr(error, "reported", False):
        return
    if os.environ.get("RANK", "0") == "0":
        print(f"vmoe {command}: error: {error}", file=sys.stderr, flush=True)
    error.reported = True  # type: ignore[attr-defined]
