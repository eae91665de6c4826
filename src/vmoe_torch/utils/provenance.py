"""What a model records of the files it came from: names and content hashes,
never local absolute paths (which would leak into published model cards and
config.json files, and mean nothing on another machine)."""
from __future__ import annotations

import hashlib
import os
from typing import Any


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _members(path: str) -> list[str]:
    """The files `path` stands for: itself, a directory's files, or a
    checkpoint prefix's files (`prefix.index`, `prefix.data-*`)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                      if not n.startswith("."))
    folder, stem = os.path.split(os.path.abspath(path))
    found = sorted(os.path.join(folder, n) for n in os.listdir(folder or ".") if n.startswith(stem + "."))
    if not found:
        raise FileNotFoundError(f"{path!r} is neither a file, a directory nor a checkpoint prefix.")
    return found


def file_record(path: str) -> dict[str, Any]:
    """{"file": the base name, "sha256": of the content}. A directory or a
    checkpoint prefix hashes its files' names and hashes in sorted order."""
    files = _members(path)
    name = os.path.basename(os.path.normpath(path))
    if files == [path]:
        return {"file": name, "sha256": _sha256(path)}
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{os.path.relpath(f, base)}\0{_sha256(f)}\n".encode())
    return {"file": name, "sha256": digest.hexdigest()}
