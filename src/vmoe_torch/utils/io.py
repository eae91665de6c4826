"""Atomic writes, the one implementation every writer uses: a temporary
file or directory next to the target, then `os.replace`, so a reader (or a
killed run) never sees a half-written result. Temporary files and
directories are created private by `tempfile`; before they are renamed into
place they get the permissions an ordinary `open` / `mkdir` would give under
the process umask, so teammates can read results as with any other tool."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

TMP_PREFIX = ".tmp-"


def looks_like_pickle(path: str) -> bool:
    """True for a pickle or a torch.save zip archive (what a `.pth` holds),
    to tell a mislabelled file from a damaged safetensors one."""
    import zipfile
    with open(path, "rb") as f:
        return f.read(1) == b"\x80" or zipfile.is_zipfile(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool) -> int:
    """Permissions a new file (0o666) or directory (0o777) gets under the umask."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def atomic_write_bytes(path: str, data: bytes, fsync: bool = True) -> None:
    """Writes `data` to `path` atomically (and durably with `fsync`)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, default_mode(is_dir=False))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text needs a str, got {type(text).__name__}.")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, data: Any) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def temporary_directory(path: str) -> str:
    """A new private temporary sibling of `path` to fill and then pass to
    `commit_directory` (removed by `remove_orphan_temporaries` if the
    writer is killed first)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.path.basename(path)}.")


def commit_directory(tmp: str, path: str, overwrite: bool = False) -> None:
    """Renames the filled temporary directory `tmp` to `path` (an existing
    `path` only with `overwrite`: swapped out, then removed), with the
    permissions an ordinary `mkdir`/`open` would have given; the rename is
    made durable by syncing the parent directory."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.chmod(tmp, default_mode(is_dir=True))
    for root, dirs, files in os.walk(tmp):
        for name in files:
            os.chmod(os.path.join(root, name), default_mode(is_dir=False))
        for name in dirs:
            os.chmod(os.path.join(root, name), default_mode(is_dir=True))
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path!r} already exists; pass overwrite=True (--overwrite).")
        old = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}old.")
        os.rmdir(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary sibling directory to fill; on success it replaces
    `path` (an existing `path` only with `overwrite`, swapped out and then
    removed), on any failure it is removed and `path` is untouched."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(path)!r} already exists; pass overwrite=True (--overwrite).")
    tmp = temporary_directory(path)
    try:
        yield tmp
        commit_directory(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
