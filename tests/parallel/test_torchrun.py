"""`vmoe train --expert-parallel` under torchrun: re-sharding on resume and
recovery from a killed rank with --max-restarts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import TINY

pytestmark = pytest.mark.distributed
STEPS = 6


def _sets(extra=()):
    overrides = TINY + [f"train.steps={STEPS}", "train.checkpoint_every=3", "train.keep_checkpoints=3",
                        "train.device=cpu"] + list(extra)
    return [a for o in overrides for a in ("--set", o)]


def _env(**kw):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)


def _train(workdir, nproc, extra=(), env=None, max_restarts=0, kill=None, flags=("--expert-parallel",)):
    """`kill=(step, rank)`: run through fault_entry.py, which SIGKILLs that rank."""
    args = ["train", "--workdir", str(workdir), *_sets(extra)]
    entry = ["-m", "vmoe_torch.cli.main"]
    if kill is not None:
        entry = [os.path.join(os.path.dirname(__file__), "fault_entry.py"), str(kill[0]), str(kill[1])]
    if nproc == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", *entry, *args, *flags]
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # keep the whole log: a rare failure must be diagnosable
        log = os.path.join(str(workdir), "..", f"{os.path.basename(str(workdir))}-stderr.log")
        with open(log, "w") as f:
            f.write(proc.stderr)
    assert proc.returncode == 0, f"full log: {log}\n" + proc.stderr[-20000:]
    return proc


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref")
    _train(wd, 1)
    return _losses(wd)


def test_resume_on_other_world_sizes(tmp_path, reference):
    first = tmp_path / "two"
    _train(first, 2, ["train.steps=3"])
    assert sorted(_losses(first)) == [1, 2, 3]
    for step in (1, 2, 3):
        assert _losses(first)[step] == pytest.approx(reference[step], abs=1e-5)
    for world in (4, 1):
        wd = tmp_path / f"resume{world}"
        shutil.copytree(first, wd)
        _train(wd, world)
        got = _losses(wd)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in range(4, STEPS + 1):
            assert got[step] == pytest.approx(reference[step], abs=1e-5), (world, step)
    # The expert-parallel checkpoint exports to the from_pretrained format.
    import vmoe_torch
    model = vmoe_torch.from_pretrained(str(tmp_path / "resume4" / "final"))
    assert model.moe_layers()["encoderblock_0"].experts.w1.shape[0] == 4


@pytest.mark.parametrize("flags, world, resume_worlds, extra", [
    (("--fsdp", "--expert-parallel"), 2, (4, 1), ()),  # experts over all ranks, the rest FSDP-sharded
    (("--fsdp",), 2, (4,), ()),                        # FSDP data parallel (experts FSDP-sharded too)
    (("--fsdp",), 4, (2,), ("train.expert_shards=2",)),  # a 2 x 2 mesh: experts over 2, replicated over 2
], ids=["fsdp_ep", "fsdp_dp", "fsdp_2x2"])
def test_fsdp_resume_on_other_world_sizes(tmp_path, reference, flags, world, resume_worlds, extra):
    first = tmp_path / "first"
    _train(first, world, ["train.steps=3", *extra], flags=flags)
    for step in (1, 2, 3):
        assert _losses(first)[step] == pytest.approx(reference[step], abs=1e-5)
    for resume in resume_worlds:
        wd = tmp_path / f"resume{resume}"
        shutil.copytree(first, wd)
        _train(wd, resume, flags=flags)  # re-sharded for another mesh (the 2 x 2 run resumes with P = 1)
        got = _losses(wd)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in range(4, STEPS + 1):
            assert got[step] == pytest.approx(reference[step], abs=1e-5), (flags, resume, step)
    import vmoe_torch
    model = vmoe_torch.from_pretrained(str(tmp_path / f"resume{resume_worlds[0]}" / "final"))
    assert model.moe_layers()["encoderblock_0"].experts.w1.shape[0] == 4


def test_killed_rank_recovers_with_max_restarts(tmp_path, reference):
    wd = tmp_path / "killed"
    proc = _train(wd, 2, max_restarts=1, kill=(4, 1))
    got = _losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step
    assert "restart" in (proc.stderr + proc.stdout).lower() or "failed" in proc.stderr.lower()
