"""Checkpoints, automatic resume, SIGKILL/SIGTERM, and work-dir safety."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from helpers import TINY, logged_losses, subprocess_env, train_cmd

from vmoe_torch.config import load_config
from vmoe_torch.train.checkpoint import list_checkpoints
from vmoe_torch.train.trainer import Trainer

STEPS = 16


def _cmd(workdir, extra=()):
    return train_cmd(workdir, STEPS, checkpoint_every=4, extra=extra)


_env = subprocess_env
_losses = logged_losses


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_losses(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), check=True, env=_env(), capture_output=True, timeout=300)
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    rng = random.Random(os.getpid())
    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpts = list_checkpoints(str(killed))
            if ckpts and target is None:
                target = ckpts[0][0] + rng.randint(1, 3)   # a random step after the first checkpoint
            if target is not None and os.path.exists(killed / "metrics.jsonl") and \
                    max(_losses(killed), default=0) >= target:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed_from = list_checkpoints(str(killed))[-1][0]
    assert resumed_from < STEPS
    subprocess.run(_cmd(killed), check=True, env=_env(), capture_output=True, timeout=300)
    got = _losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])
    assert len(list_checkpoints(str(killed))) == 2  # keep_checkpoints


def test_sigterm_writes_checkpoint_and_exits_143(tmp_path):
    wd = tmp_path / "wd"
    proc = subprocess.Popen(_cmd(wd, ["train.steps=400", "train.checkpoint_every=1000"]), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(wd / "metrics.jsonl") and _losses(wd)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err  # 128 + SIGTERM: schedulers see an unfinished job
    assert "stopped by signal" in out
    ckpts = list_checkpoints(str(wd))
    assert len(ckpts) == 1 and 1 <= ckpts[0][0] < 400


def test_workdir_with_other_config_needs_force(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=4"])
    Trainer(cfg, str(tmp_path)).fit()
    other = load_config(None, TINY + ["train.steps=4", "optim.lr=0.01"])
    with pytest.raises(ValueError, match="different config"):
        Trainer(other, str(tmp_path)).fit()
    summary = Trainer(other, str(tmp_path), force=True).fit()
    assert summary["status"] == "completed"
    # Extending a run (more steps, same config) resumes instead.
    longer = load_config(None, TINY + ["train.steps=6", "optim.lr=0.01"])
    Trainer(longer, str(tmp_path)).fit()
    assert sorted(_losses(str(tmp_path))) == list(range(1, 7))
    assert os.path.exists(tmp_path / "final" / "model.safetensors")


def test_bad_data_and_model_errors_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(load_config(None, TINY + ["data.name=imagefolder", f"data.path={tmp_path}/nope"]), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="multiple of"):
        Trainer(load_config(None, TINY + ["data.image_size=36"]), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="num_selected_experts"):
        Trainer(load_config(None, TINY + ["model.moe.routing.num_selected_experts=9"]), str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
