"""One training run per work dir: a pid-stamped lock file, with stale-lock
detection, and clean-up of the temporary files a killed writer left."""
from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from typing import Optional

from ..utils.errors import RunRefused
from ..utils.io import TMP_PREFIX

LOCK_NAME = ".vmoe.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds WORKDIR/.vmoe.lock for the run.

    A second run in the same work dir gets a clear error naming the first
    one's pid and host. A lock whose process is gone (same host, pid not
    alive: a SIGKILLed run) is stale and is taken over with a warning.
    """

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, LOCK_NAME)
        self.held = False

    def _owner(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                    warnings.warn(f"Taking over the stale lock {self.path!r} of pid {owner.get('pid')} "
                                  "(that process is gone).")
                    os.unlink(self.path)
                    continue
                if owner is None:  # a lock file being written right now, or torn: retry once
                    continue
                raise RunRefused(
                    f"Another run (pid {owner.get('pid')} on {owner.get('host')}) is using work dir "
                    f"{os.path.dirname(self.path)!r}. Wait for it, use another --workdir, or, if that "
                    f"process is really gone, delete {self.path!r}.")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RuntimeError(f"Could not take the work dir lock {self.path!r}.")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_orphan_temporaries(workdir: str) -> list[str]:
    """Deletes the temporary files and directories (prefix `.tmp-`) that
    atomic writes in this work dir left behind when their process was killed.
    Call it only while holding the work dir lock: then no writer is active."""
    removed = []
    for folder in (workdir, os.path.join(workdir, "checkpoints")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(TMP_PREFIX):
                path = os.path.join(folder, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
                removed.append(path)
    return removed
