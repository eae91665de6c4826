"""Atomic writes: complete content or the previous file, never a torn one."""
from __future__ import annotations

import json
import os

import pytest

from vmoe_torch.utils.io import atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(str(path), {"a": 1})
    atomic_write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert os.listdir(tmp_path) == ["out.json"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text(str(path), "old\n")

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(str(path), {"x": Unserialisable()})
    with pytest.raises(TypeError):
        atomic_write_text(str(path), None)  # type: ignore[arg-type]
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["report.md"]
