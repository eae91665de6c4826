"""A kill storm: a training run SIGKILLed at random moments (during start-up,
mid-step and while checkpoints are written), restarted each time, ends with
per-step losses identical to the bit to an uninterrupted run, with nothing
left behind (no temporaries, no lock)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from helpers import logged_losses, subprocess_env, train_cmd

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
STEPS = 80  # room for ten kills even where a step takes a few milliseconds


def cmd(workdir):
    return train_cmd(workdir, STEPS, checkpoint_every=2)


env = subprocess_env
losses = logged_losses


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
