"""A failed start changes nothing in the work dir; --force says what it
deletes; unwritable work dirs and impossible world sizes fail before any work,
and a torchrun job reports a bad input once."""
from __future__ import annotations

import json
import os

import pytest
from helpers import TINY

from vmoe_torch.config import load_config
from vmoe_torch.train import trainer as trainer_module
from vmoe_torch.train.checkpoint import list_checkpoints
from vmoe_torch.train.trainer import Trainer

pytestmark = pytest.mark.reliability


def _identity(workdir):
    return json.loads((workdir / "run_identity.json").read_text())


def test_failed_start_keeps_the_identity_and_the_checkpoints(tmp_path, monkeypatch):
    """Issue 14 #13: the identity is written only once set-up succeeded, so a
    start that fails (here, at the optimizer) leaves the work dir as it was,
    and the original config still resumes."""
    a = load_config(None, TINY + ["train.steps=4", "train.checkpoint_every=2"])
    Trainer(a, str(tmp_path)).fit()
    before, steps = _identity(tmp_path), list_checkpoints(str(tmp_path))
    config_yaml = (tmp_path / "config.yaml").read_text()

    def broken(*args, **kwargs):
        raise ValueError("optimizer exploded")
    monkeypatch.setattr(trainer_module, "build_optimizer", broken)
    other = load_config(None, TINY + ["train.steps=4", "optim.lr=0.5"])
    with pytest.warns(UserWarning, match="will be deleted"), pytest.raises(ValueError, match="exploded"):
        Trainer(other, str(tmp_path), force=True).fit()
    assert _identity(tmp_path) == before and list_checkpoints(str(tmp_path)) == steps
    assert (tmp_path / "config.yaml").read_text() == config_yaml
    monkeypatch.undo()
    longer = load_config(None, TINY + ["train.steps=6", "train.checkpoint_every=2"])
    assert Trainer(longer, str(tmp_path)).fit()["status"] == "completed"


def test_force_says_which_checkpoints_it_deletes(tmp_path):
    Trainer(load_config(None, TINY + ["train.steps=2"]), str(tmp_path)).fit()
    other = load_config(None, TINY + ["train.steps=2", "optim.lr=0.5"])
    with pytest.raises(ValueError, match="different config.*--force"):
        Trainer(other, str(tmp_path)).fit()
    with pytest.warns(UserWarning, match=r"deleted the previous config's checkpoints \(steps \[2\]\)"):
        Trainer(other, str(tmp_path), force=True).fit()
    assert _identity(tmp_path)["optim"]["lr"] == 0.5


def test_unwritable_work_dir_fails_before_data_and_model(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    built = []
    monkeypatch.setattr(trainer_module, "build_datasets", lambda *a: built.append(1))
    with pytest.raises(ValueError, match="not writable.*Choose another --workdir"):
        Trainer(load_config(None, TINY), str(blocker / "run"))
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a normal user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            Trainer(load_config(None, TINY), str(ro / "run"))
    assert not built


def test_world_size_not_dividing_experts_is_reported_once(capsys, monkeypatch):
    """Issue 14 #17: the divisibility error lists the valid world sizes, and
    `vmoe` prints an error only on rank 0 (every rank meets the same input)."""
    from vmoe_torch import create_model
    from vmoe_torch.cli.main import main
    from vmoe_torch.distributed.expert_parallel import check_expert_parallel
    model = create_model("vmoe_mi4_every2_e8_k2", num_experts=6)
    with pytest.raises(ValueError, match=r"world size \(4\).*experts \(6\).*\[1, 2, 3, 6\]"):
        check_expert_parallel(model, 4)
    check_expert_parallel(model, 3)
    printed = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--workdir", "/nonexistent-dir/x", "no-such-config.yaml"]) == 2
        printed[rank] = capsys.readouterr().err
    assert printed["1"] == "" and "vmoe train: error" in printed["0"]


def test_load_model_skips_an_unreadable_newest_checkpoint(tmp_path):
    from vmoe_torch.models.loading import load_model
    Trainer(load_config(None, TINY + ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3"]),
            str(tmp_path)).fit()
    newest = list_checkpoints(str(tmp_path))[-1][1]
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="step_00000004"):
        model = load_model(str(tmp_path))
    assert model.config.moe is not None


@pytest.mark.parametrize("outcome, code", [("ok", 0), ("refused", 2), ("bug", 1)])
def test_a_torchrun_worker_leaves_through_os_exit_on_every_path(monkeypatch, capsys, outcome, code):
    """Under torchrun the interpreter's finalisation can meet gloo's threads
    and abort (SIGABRT) after a finished run too, so every path, success
    included, ends in os._exit with the command's code; an unexpected error
    still prints its traceback first. Outside torchrun nothing changes."""
    from vmoe_torch.cli import main as cli_main

    def command(args):
        if outcome == "refused":
            raise ValueError("a bad input")
        if outcome == "bug":
            raise RuntimeError("a defect")
        return 0

    class Exited(Exception):
        pass

    def fake_exit(c):
        raise Exited(c)
    parser = cli_main.build_parser()
    real_parse = parser.parse_args
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: _with_func(real_parse(argv), command))
    monkeypatch.setattr(cli_main.os, "_exit", fake_exit)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with pytest.raises(Exited) as exited:
        cli_main.main(["models"])
    assert exited.value.args == (code,)
    err = capsys.readouterr().err
    assert ("RuntimeError: a defect" in err) == (outcome == "bug")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    if outcome == "bug":
        with pytest.raises(RuntimeError, match="a defect"):
            cli_main.main(["models"])
    else:
        assert cli_main.main(["models"]) == code


def _with_func(args, func):
    args.func = func
    return args
