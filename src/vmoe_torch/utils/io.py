"""Atomic file writes: a temporary file in the same directory, then
`os.replace`, so a reader (or a killed run) never sees a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, data: Any) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
