"""A kill storm: a training run SIGKILLed at random moments (during start-up,
mid-step and while checkpoints are written), restarted each time, ends with
per-step losses identical to the bit to an uninterrupted run, with nothing
left behind (no temporaries, no lock)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import TINY

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
STEPS = 40


def cmd(workdir):
    sets = TINY + [f"train.steps={STEPS}", "train.checkpoint_every=2", "train.keep_checkpoints=2"]
    return [sys.executable, "-m", "vmoe_torch.cli.main", "train", "--workdir", str(workdir),
            *[a for s in sets for a in ("--set", s)]]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def losses(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by the kill; the next run repairs it
            pass
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_ten_random_sigkills_then_identical_losses_and_a_clean_work_dir(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), check=True, env=env(), capture_output=True, timeout=300)
    expected = losses(ref)
    assert sorted(expected) == list(range(1, STEPS + 1))

    wd = tmp_path / "storm"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(40):
        if kills >= 10:
            break
        proc = subprocess.Popen(cmd(wd), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The first kills land in start-up (imports, data, model); later ones once training runs.
        wait_until = time.time() + (rng.uniform(0.2, 1.5) if kills < 3 else 60)
        target = None if kills < 3 else max(losses(wd), default=0) + rng.randint(1, 3)
        while time.time() < wait_until and proc.poll() is None:
            if target is not None and max(losses(wd), default=0) >= target:
                time.sleep(rng.uniform(0.0, 0.15))  # now and then inside a checkpoint write
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
        if max(losses(wd), default=0) >= STEPS:
            break
    assert kills >= 10, kills
    subprocess.run(cmd(wd), check=True, env=env(), capture_output=True, timeout=300)  # the last, unkilled run
    got = losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == expected[s] for s in got), [(s, got[s], expected[s]) for s in got if got[s] != expected[s]]
    leftovers = [name for folder in (wd, wd / "checkpoints") for name in os.listdir(folder)
                 if name.startswith(".tmp-") or name == ".vmoe.lock"]
    assert leftovers == []
