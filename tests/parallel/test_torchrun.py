"""`vmoe train --expert-parallel` / `--fsdp` under torchrun: sharded (DCP)
checkpoints, re-sharding on resume, recovery from a killed rank with
--max-restarts, and kills during a checkpoint's save."""
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


def _train(workdir, nproc, extra=(), env=None, max_restarts=0, kill=None, flags=("--expert-parallel",),
           fails=False):
    """`kill=(where, step, rank)`: run through fault_entry.py, which SIGKILLs
    that rank there; `fails`: the run is expected to fail."""
    args = ["train", "--workdir", str(workdir), *_sets(extra)]
    entry = ["-m", "vmoe_torch.cli.main"]
    if kill is not None:
        entry = [os.path.join(os.path.dirname(__file__), "fault_entry.py"), *map(str, kill)]
    if nproc == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", *entry, *args, *flags]
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=300)
    if fails:
        assert proc.returncode != 0, proc.stderr[-5000:]
        return proc
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
def reference_dir(tmp_path_factory):
    """The single-process run every distributed run must reproduce."""
    wd = tmp_path_factory.mktemp("ref")
    _train(wd, 1)
    return wd


@pytest.fixture(scope="module")
def reference(reference_dir):
    return _losses(reference_dir)


def test_resume_on_other_world_sizes(tmp_path, reference):
    first = tmp_path / "two"
    _train(first, 2, ["train.steps=3"])
    assert sorted(_losses(first)) == [1, 2, 3]
    for step in (1, 2, 3):
        assert _losses(first)[step] == pytest.approx(reference[step], abs=1e-5)
    for world in (4,):  # (resuming on 1 process: the fsdp_ep case)
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
def test_fsdp_resume_on_other_world_sizes(tmp_path, reference, reference_dir, flags, world, resume_worlds, extra):
    first = tmp_path / "first"
    _train(first, world, ["train.steps=3", *extra], flags=flags)
    for step in (1, 2, 3):
        assert _losses(first)[step] == pytest.approx(reference[step], abs=1e-5)
    _check_sharded_layout(first / "checkpoints" / "step_00000003", world)
    for resume in resume_worlds:
        wd = tmp_path / f"resume{resume}"
        shutil.copytree(first, wd)
        _train(wd, resume, flags=flags)  # re-sharded for another mesh (the 2 x 2 run resumes with P = 1)
        got = _losses(wd)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in range(4, STEPS + 1):
            assert got[step] == pytest.approx(reference[step], abs=1e-5), (flags, resume, step)
    # final/ is streamed from the last sharded checkpoint; its logits are the
    # single-process run's, and those of the checkpoint read directly
    import torch

    import vmoe_torch
    from vmoe_torch.models.loading import load_model
    done = tmp_path / f"resume{resume_worlds[0]}"
    model = vmoe_torch.from_pretrained(str(done / "final"))
    assert model.moe_layers()["encoderblock_0"].experts.w1.shape[0] == 4
    x = torch.rand(4, 3, *model.config.image_size) * 2 - 1
    with torch.no_grad():
        got = model(x)
        assert torch.equal(got, load_model(str(done))(x))
        assert torch.allclose(got, vmoe_torch.from_pretrained(str(reference_dir / "final"))(x), atol=1e-4)


def _check_sharded_layout(ckpt, world):
    """A DCP checkpoint in which every rank wrote its own file, every chunk
    once, no file holds (nearly) everything, and the experts' chunks come
    from more than one rank."""
    from torch.distributed.checkpoint import FileSystemReader
    assert (ckpt / ".metadata").exists() and (ckpt / "state.json").exists()
    metadata = FileSystemReader(str(ckpt)).read_metadata()
    files = {}
    expert_files = set()
    for index, info in metadata.storage_data.items():
        files[info.relative_path] = files.get(info.relative_path, 0) + info.length
        if ".experts.w1" in index.fqn and index.fqn.startswith("model/"):
            expert_files.add(info.relative_path)
    assert len(files) == world, files
    assert max(files.values()) < 0.75 * sum(files.values()), files
    assert len(expert_files) > 1
    chunks = [(i.fqn, tuple(i.offset or ())) for i in metadata.storage_data]
    assert len(chunks) == len(set(chunks))  # each chunk written once (replicas deduplicated)


def test_kills_during_a_sharded_save_keep_the_last_checkpoint(tmp_path, reference):
    """SIGKILL while the step-6 checkpoint is written, twice: rank 1 mid-shard
    (rank 0 gets the error and removes the temporary directory), then rank 0
    after every shard and DCP's .metadata, just before the rename (the
    orphan stays). Step 3 stays the last complete checkpoint; the next run
    removes the orphan and resumes from it with the uninterrupted run's
    losses. Then a truncated shard in the newest checkpoint is skipped for
    the older one."""
    from vmoe_torch.storage.workdir import list_checkpoints
    flags = ("--fsdp", "--expert-parallel")
    wd = tmp_path / "run"

    def orphans():
        return [p for p in os.listdir(wd / "checkpoints") if p.startswith(".tmp-step_00000006")]
    _train(wd, 2, kill=("shard", STEPS, 1), flags=flags, fails=True)
    assert [s for s, _ in list_checkpoints(str(wd))] == [3] and not orphans()
    _train(wd, 2, kill=("commit", STEPS, 0), flags=flags, fails=True)
    assert [s for s, _ in list_checkpoints(str(wd))] == [3] and orphans()
    proc = _train(wd, 2, flags=flags)
    assert "left by a killed write" in proc.stderr and not orphans()
    got = _losses(wd)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step
    shard = wd / "checkpoints" / "step_00000006" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    (wd / "eval.json").unlink()
    proc = _train(wd, 2, flags=flags)
    assert "Skipping unreadable checkpoint" in proc.stderr and "step_00000006" in proc.stderr
    got = _losses(wd)
    for step in range(4, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step


def test_killed_rank_recovers_with_max_restarts(tmp_path, reference):
    wd = tmp_path / "killed"
    proc = _train(wd, 2, max_restarts=1, kill=("step", 4, 1))
    got = _losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step
    assert "restart" in (proc.stderr + proc.stdout).lower() or "failed" in proc.stderr.lower()


@pytest.mark.slow
def test_compiled_fsdp_expert_parallel_training_equals_one_process(tmp_path, reference):
    """train.compile with --fsdp --expert-parallel on 2 ranks: each block is
    one graph (fullgraph; FSDP's hooks between blocks eager) with the token
    exchange traced (functional collectives), no recompilation from step to
    step; losses as one eager process. (Compiled expert parallelism without
    FSDP, the whole model as one graph: tests/parallel/test_expert_parallel.py
    compiles the layer.)"""
    wd = tmp_path / "compiled"
    proc = _train(wd, 2, ["train.steps=2", "train.compile=true", "train.compile_backend=aot_eager"],
                  env=_env(TORCH_LOGS="recompiles"), flags=("--fsdp", "--expert-parallel"))
    assert "Recompiling" not in proc.stderr
    got = _losses(wd)
    for step in (1, 2):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.mark.slow
def test_checkpoint_memory_benchmark_runs():
    """benchmarks/checkpoint_memory.py at a small size (its figures are in
    docs/benchmarks.md; here only that it runs and prints every rank)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "checkpoint_memory.py"), "--smoke",
                          "--worlds", "2"], env=_env(), capture_output=True, text=True, timeout=300, check=True).stdout
    assert "| 2 | 0 |" in out and "| 2 | 1 |" in out and "full layout" in out


def _fsdp_run(tmp_path_factory_dir):
    """A finished 2-rank FSDP + expert-parallel run (checkpoints at 3 and 6)."""
    _train(tmp_path_factory_dir, 2, flags=("--fsdp", "--expert-parallel"))
    return tmp_path_factory_dir


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return _fsdp_run(tmp_path_factory.mktemp("fsdp_run"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refusals_are_agreed_by_every_rank_and_reported_once(tmp_path, fsdp_run):
    """No readable checkpoint, and a work dir locked by another live run: every
    rank leaves together (no SIGABRT at teardown, no rank wandering on into
    restore), with one error line; a truncated shard is named with its file,
    once."""
    flags = ("--fsdp", "--expert-parallel")
    state = json.loads((fsdp_run / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["expert_parallel"] is True and state["fsdp"] is True and state["world_size"] == 2
    damaged = _copy(fsdp_run, tmp_path / "damaged")
    for shard in damaged.glob("checkpoints/*/__*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    for attempt in range(3):  # the abort at teardown came in about one run of two
        proc = _train(damaged, 2, ["train.steps=9"], flags=flags, fails=True)
        if "terminate called" in proc.stderr or "SIGABRT" in proc.stderr:
            (tmp_path.parent / f"abort-{attempt}.log").write_text(proc.stderr)  # keep the whole log
        assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr, attempt
        assert proc.stderr.count("vmoe train: error: No readable checkpoint") == 1
        assert "__1_0.distcp is truncated (100 of" in proc.stderr
        assert proc.stderr.count("Skipping unreadable checkpoint: '") == 2  # two checkpoints, once each
    locked = _copy(fsdp_run, tmp_path / "locked")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import socket
        (locked / ".vmoe.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        proc = _train(locked, 2, ["train.steps=9"], flags=flags, fails=True)
    finally:
        holder.kill()
    assert proc.stderr.count(f"vmoe train: error: Another run (pid {holder.pid}") == 1
    assert "unreadable" not in proc.stderr and "terminate called" not in proc.stderr
    assert sorted(_losses(locked)) == list(range(1, STEPS + 1))  # nothing of the locked run changed


def test_killing_torchrun_stops_its_workers_at_a_checkpoint(tmp_path):
    """torchrun SIGKILLed: its workers (in their own sessions) notice their
    agent is gone, checkpoint the step, release the lock and exit; the run
    resumes from that step."""
    import signal
    import time
    wd = tmp_path / "orphans"
    args = ["train", "--workdir", str(wd), *_sets(["train.steps=5000", "train.checkpoint_every=50"])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "vmoe_torch.cli.main", *args, "--expert-parallel"]
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (wd / "checkpoints" / "step_00000050").exists():
        time.sleep(0.2)
    assert (wd / "checkpoints" / "step_00000050").exists(), agent.stderr.read() if agent.poll() else ""
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    deadline = time.time() + 60
    while time.time() < deadline and (wd / ".vmoe.lock").exists():
        time.sleep(0.2)
    assert not (wd / ".vmoe.lock").exists(), "the workers kept training after their agent died"
    from vmoe_torch.storage.workdir import list_checkpoints
    last = list_checkpoints(str(wd))[-1][0]
    assert 50 < last < 5000
    assert max(_losses(wd)) == last  # stopped at the step it checkpointed
