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


def test_results_respect_the_umask(tmp_path):
    """Files and directories written atomically get what open/mkdir give under
    the umask (not tempfile's private 0600/0700)."""
    import stat

    import torch

    from vmoe_torch import create_model, save_pretrained
    from vmoe_torch.utils.io import atomic_directory
    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "eval.json"), {"top1": 1.0})
        with atomic_directory(str(tmp_path / "d")) as d:
            (open(os.path.join(d, "f"), "w")).close()
        torch.manual_seed(0)
        save_pretrained(create_model("vmoe_dense_mi4"), str(tmp_path / "final"))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "eval.json") == 0o644
    assert mode(tmp_path / "d") == 0o755 and mode(tmp_path / "d" / "f") == 0o644
    assert mode(tmp_path / "final") == 0o755 and mode(tmp_path / "final" / "model.safetensors") == 0o644
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_atomic_directory_failure_and_overwrite(tmp_path):
    from vmoe_torch.utils.io import atomic_directory
    target = tmp_path / "out"
    with atomic_directory(str(target)) as d:
        open(os.path.join(d, "a"), "w").write("1")
    with pytest.raises(FileExistsError):
        with atomic_directory(str(target)):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target), overwrite=True) as d:
            open(os.path.join(d, "a"), "w").write("2")
            raise RuntimeError("killed half-way")
    assert (target / "a").read_text() == "1"          # the old result is untouched
    with atomic_directory(str(target), overwrite=True) as d:
        open(os.path.join(d, "b"), "w").write("3")
    assert sorted(os.listdir(target)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_one_seed_rule_reproduces_the_historical_streams():
    from vmoe_torch.train.trainer import step_seed
    from vmoe_torch.utils.seeds import derive_seed
    assert derive_seed(5) == 5 and derive_seed(5, 7) == 5 * 1_000_003 + 7
    assert derive_seed(1, 2, 3) == (1 * 1_000_003 + 2) * 1_000_003 + 3
    assert step_seed(3, 10) == (3 * 1_000_003 + 10) * 7 + 3
