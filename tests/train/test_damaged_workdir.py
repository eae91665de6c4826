"""A damaged work dir, crossed with every consumer: each kind of damage
meets resume (`vmoe train` again), eval (`load_model`) and export
(`consolidate`), each giving the outcome docs/usage.md documents, and no
metrics are lost."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
from helpers import TINY

from vmoe_torch.config import load_config
from vmoe_torch.models.loading import consolidate, load_model
from vmoe_torch.storage.workdir import CorruptCheckpoint
from vmoe_torch.train.trainer import Trainer
from vmoe_torch.utils.errors import RunRefused

pytestmark = pytest.mark.reliability

NEWEST, OLDER = "step_00000012", "step_00000008"


def _cfg():
    return load_config(None, TINY + ["train.steps=12", "train.checkpoint_every=4", "train.keep_checkpoints=3"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    wd = tmp_path_factory.mktemp("finished") / "run"
    Trainer(_cfg(), str(wd)).fit()
    return wd


def _ckpt(wd, name):
    return wd / "checkpoints" / name


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


# damage -> (what it does to the work dir, the checkpoint every consumer falls back to, or None)
DAMAGE = {
    "newest without state.json": (lambda wd: (_ckpt(wd, NEWEST) / "state.json").unlink(), OLDER),
    "newest with a torn state.json": (lambda wd: (_ckpt(wd, NEWEST) / "state.json").write_text("{\"st"), OLDER),
    "newest with truncated weights": (lambda wd: _truncate(_ckpt(wd, NEWEST) / "model.safetensors"), OLDER),
    "every checkpoint without state.json": (
        lambda wd: [(c / "state.json").unlink() for c in (wd / "checkpoints").iterdir()], None),
    "every checkpoint with truncated weights": (
        lambda wd: [_truncate(c / "model.safetensors") for c in (wd / "checkpoints").iterdir()], None),
    "an orphaned temporary checkpoint": (
        lambda wd: shutil.copytree(_ckpt(wd, NEWEST), wd / "checkpoints" / ".tmp-step_00000016.x"), NEWEST),
}


def _damaged(finished, tmp_path, damage):
    wd = tmp_path / "run"
    shutil.copytree(finished, wd)
    (wd / "eval.json").unlink()
    DAMAGE[damage][0](wd)
    return wd


def _metrics(wd):
    return (wd / "metrics.jsonl").read_text()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume(finished, tmp_path, damage):
    wd = _damaged(finished, tmp_path, damage)
    before, fallback = _metrics(wd), DAMAGE[damage][1]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if fallback is None:
            with pytest.raises((RunRefused, CorruptCheckpoint)) as e:
                Trainer(_cfg(), str(wd)).fit()
            assert "step_0000001" in str(e.value) or "damaged" in str(e.value)
            assert _metrics(wd) == before  # refused before anything changed
            return
        summary = Trainer(_cfg(), str(wd)).fit()
    assert summary["status"] == "completed"
    if fallback == OLDER:
        assert any(NEWEST in str(w.message) and "Skipping" in str(w.message) for w in seen)
    else:  # nothing lost; the orphan is removed
        assert any("left by a killed write" in str(w.message) for w in seen)
        assert not list((wd / "checkpoints").glob(".tmp-*"))
    rows = [json.loads(line) for line in _metrics(wd).splitlines()]
    old = [json.loads(line) for line in before.splitlines()]
    assert rows[:len(old)][:8] == old[:8]  # the steps up to the fallback are kept
    assert max(r["step"] for r in rows) == 12


@pytest.mark.parametrize("consumer", ["eval", "export"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_eval_and_export(finished, tmp_path, damage, consumer):
    wd = _damaged(finished, tmp_path, damage)
    before, fallback = _metrics(wd), DAMAGE[damage][1]

    def consume():
        if consumer == "eval":
            return load_model(str(wd))
        return consolidate(str(wd), str(tmp_path / "out"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if fallback is None:
            with pytest.raises((FileNotFoundError, ValueError), match="no checkpoint yet|No readable checkpoint"):
                consume()
        else:
            used = consume()
            if consumer == "export":
                assert used.endswith(fallback)
    if fallback == OLDER:
        assert any(NEWEST in str(w.message) for w in seen)  # the skipped one is named
    assert _metrics(wd) == before  # readers never touch the metrics
