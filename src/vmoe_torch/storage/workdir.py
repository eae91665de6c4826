"""The layout of a training work dir, shared by the trainer (which writes
it) and the loaders (which read models from it).

    WORKDIR/run_identity.json, config.yaml, metrics.jsonl, eval.json, final/
    WORKDIR/checkpoints/step_00000123/{model.safetensors, optimizer.safetensors,
                                       state.json, config.json}
or, written by a sharded run (torch.distributed.checkpoint: one file per rank),
    WORKDIR/checkpoints/step_00000123/{__0_0.distcp, ..., .metadata,
                                       state.json, config.json}
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Callable, Optional, TypeVar

from ..utils.ranks import warn_once

_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "checkpoints", f"step_{step:08d}")


def is_sharded_checkpoint(path: str) -> bool:
    """A checkpoint written with torch.distributed.checkpoint (by a sharded run)."""
    return os.path.exists(os.path.join(path, ".metadata"))


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def list_checkpoints(workdir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the complete checkpoints (those with a state.json), oldest first."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for d in os.listdir(root):
        m = _NAME.match(d)
        if m and os.path.exists(os.path.join(root, d, "state.json")):
            found.append((int(m.group(1)), os.path.join(root, d)))
    return sorted(found)


def damaged_checkpoints(workdir: str) -> list[str]:
    """step_* folders without a state.json. A write that was interrupted
    stays a `.tmp-*` folder, so these were damaged after they were complete
    (or edited); resume, evaluation and consolidation warn about them."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if _NAME.match(d) and not os.path.exists(os.path.join(root, d, "state.json")))


def warn_damaged(workdir: str) -> None:
    for path in damaged_checkpoints(workdir):
        warn_once(f"Skipping damaged checkpoint {path!r}: it has no state.json (deleted or never "
                      "finished); older checkpoints are used.")


def last_logged_step(workdir: str) -> int:
    """The largest step in WORKDIR/metrics.jsonl (0 without one); damaged
    lines are passed over here (the logger reports them when it opens)."""
    path = os.path.join(workdir, "metrics.jsonl")
    last = 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    last = max(last, int(json.loads(line).get("step", 0)))
                except (ValueError, AttributeError, TypeError):
                    continue
    return last


def is_training_workdir(path: str) -> bool:
    """A work dir a run has started in (it may hold no checkpoint yet)."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("run_identity.json", "metrics.jsonl", "checkpoints"))


def latest_checkpoint(workdir: str) -> Optional[str]:
    found = list_checkpoints(workdir)
    return found[-1][1] if found else None


def check_writable(workdir: str) -> None:
    """Fails before any work starts when `workdir` cannot be written: an
    existing one must take a new file, else its nearest existing parent must
    be a writable directory (nothing is created here)."""
    path = os.path.abspath(workdir)
    try:
        if os.path.isdir(path):
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
                return
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise NotADirectoryError(20, "not a directory", parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied", parent)
    except OSError as e:
        raise ValueError(f"Work dir {workdir!r} is not writable ({type(e).__name__}: {e.strerror or e}"
                         f"{': ' + repr(e.filename) if e.filename else ''}). Choose another --workdir, or "
                         "fix its permissions / free space.") from e


T = TypeVar("T")


class CorruptCheckpoint(ValueError):
    """A checkpoint directory whose files cannot be read."""


def _read_state(path: str) -> None:
    try:
        with open(os.path.join(path, "state.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path!r} (its state.json is unreadable: {type(e).__name__}: {e})") from e


def newest_readable(workdir: str, use: Callable[[str], T],
                    skip: tuple[type[Exception], ...] = (ValueError, OSError)) -> Optional[tuple[str, T]]:
    """The one reader of a work dir's checkpoints for every consumer (resume,
    eval, consolidation): `(checkpoint, use(checkpoint))` for the newest
    checkpoint that `use` can read, or None when there is none. Damaged
    (no state.json) and unreadable newer ones are named in a warning, once;
    when every checkpoint is unreadable this raises CorruptCheckpoint,
    listing why. A FileExistsError (an output already there) is not skipped."""
    warn_damaged(workdir)
    skipped = []
    skippable: tuple[type[Exception], ...] = (CorruptCheckpoint, *skip)
    for _, path in reversed(list_checkpoints(workdir)):
        try:
            _read_state(path)  # a torn state.json makes the checkpoint unreadable for every consumer
            return path, use(path)
        except FileExistsError:
            raise
        except skippable as e:
            skipped.append(str(e) if str(e).startswith(repr(path)) else f"{path!r} ({type(e).__name__}: {e})")
            warn_once(f"Skipping unreadable checkpoint: {skipped[-1]}")
    if skipped:
        raise CorruptCheckpoint(f"No readable checkpoint in {workdir!r}: " + "; ".join(skipped)
                                + ". Move the checkpoints/ directory away to start over.")
    return None
