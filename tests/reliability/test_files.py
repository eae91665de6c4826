"""Files under failure: a corrupt latest checkpoint, a torn metrics line, two
runs in one work dir, stale locks and orphan temporaries."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import TINY, logged_losses

from vmoe_torch.config import load_config
from vmoe_torch.train.checkpoint import list_checkpoints
from vmoe_torch.train.trainer import Trainer

pytestmark = pytest.mark.reliability


_losses = logged_losses


def test_torn_last_metrics_line_is_repaired_on_resume(tmp_path):
    from vmoe_torch.train.logger import MetricsLogger
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        MetricsLogger(str(tmp_path), resume_step=2, tensorboard=False)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2"):
        MetricsLogger(str(tmp_path), resume_step=3, tensorboard=False)


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=3"])
    Trainer(cfg, str(tmp_path)).fit()
    ckpts = list_checkpoints(str(tmp_path))
    assert [s for s, _ in ckpts] == [4, 8]
    newest = ckpts[-1][1]
    data = open(os.path.join(newest, "model.safetensors"), "rb").read()
    open(os.path.join(newest, "model.safetensors"), "wb").write(data[: len(data) // 3])
    longer = load_config(None, TINY + ["train.steps=10", "train.checkpoint_every=4", "train.keep_checkpoints=3"])
    with pytest.warns(UserWarning, match="step_00000008.*model.safetensors|Skipping unreadable checkpoint"):
        summary = Trainer(longer, str(tmp_path)).fit()
    assert summary["status"] == "completed"
    assert sorted(_losses(tmp_path)) == list(range(1, 11))  # resumed from step 4, nothing lost
    # Every checkpoint unreadable: a clear error that names them.
    for _, path in list_checkpoints(str(tmp_path)):
        open(os.path.join(path, "state.json"), "w").write("{torn")
    from vmoe_torch.train.checkpoint import CorruptCheckpoint
    with pytest.raises(CorruptCheckpoint, match="No readable checkpoint"):
        Trainer(load_config(None, TINY + ["train.steps=12", "train.checkpoint_every=4"]), str(tmp_path)).fit()


def test_second_run_in_a_work_dir_is_refused_and_stale_locks_are_taken(tmp_path):
    from vmoe_torch.storage.lock import LOCK_NAME, WorkdirLock
    held = WorkdirLock(str(tmp_path))
    held.acquire()
    try:
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
            Trainer(load_config(None, TINY + ["train.steps=2"]), str(tmp_path)).fit()
    finally:
        held.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import json as _json
    import socket
    (tmp_path / LOCK_NAME).write_text(_json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    os.makedirs(tmp_path / "checkpoints" / ".tmp-step_00000004.abc")      # left by a killed write
    with pytest.warns(UserWarning, match="stale lock"):
        assert Trainer(load_config(None, TINY + ["train.steps=2"]), str(tmp_path)).fit()["status"] == "completed"
    assert not (tmp_path / LOCK_NAME).exists()
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith(".tmp-")]
