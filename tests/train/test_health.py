"""Nothing silent: a diverged run stops naming the step and keeps a finite
checkpoint, non-finite weights are not exported, every numeric setting is
finite, and expected refusals reach the user as one line."""
from __future__ import annotations

import pytest
import torch
from helpers import TINY

from vmoe_torch import create_model
from vmoe_torch.config import load_config
from vmoe_torch.config.typed import ConfigError
from vmoe_torch.data.pipeline import eval_batches
from vmoe_torch.evaluate.classification import evaluate_at_capacity
from vmoe_torch.models.loading import load_model
from vmoe_torch.storage.workdir import list_checkpoints
from vmoe_torch.train.hooks import DivergedError
from vmoe_torch.train.trainer import Trainer


def test_a_diverged_run_stops_naming_the_step_and_its_last_checkpoint_is_finite(tmp_path):
    cfg = load_config(None, TINY + ["optim.lr=1e6", "schedule.warmup_steps=0", "train.checkpoint_every=1",
                                    "train.log_every=4"])
    trainer = Trainer(cfg, str(tmp_path))
    with pytest.raises(DivergedError, match=r"diverged at step (\d+).*the last checkpoint is .*step_0+\d"):
        trainer.fit()
    steps = [s for s, _ in list_checkpoints(str(tmp_path))]
    assert steps and steps[-1] < cfg.train.steps  # it stopped, and kept what was finite
    model = load_model(str(tmp_path))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    result = evaluate_at_capacity(model, eval_batches(trainer.test_ds, 32), 4.0)
    assert 0.0 <= result["top1"] <= 1.0
    assert not (tmp_path / "final").exists()


def test_non_finite_weights_are_not_exported_unless_asked(tmp_path):
    model = create_model("vmoe_dense_mi4")
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(ValueError, match="1 tensors hold NaN or Inf values \\(head.bias\\)"):
        model.save_pretrained(str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
    model.save_pretrained(str(tmp_path / "m"), allow_nonfinite=True)
    assert (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("setting", ["optim.lr=.inf", "schedule.end_lr=.nan", "data.mixup_alpha=.inf",
                                     "eval.capacity_factor=.inf", "eval.grid_capacity_factors=[0.5, .inf]",
                                     "fewshot.l2_grid=[1.0, .nan]", "optim.grad_clip_norm=.inf"])
def test_every_numeric_setting_must_be_finite(setting):
    with pytest.raises(ConfigError, match=f"{setting.split('=')[0]} must be a finite number"):
        load_config(None, [setting])


@pytest.mark.parametrize("setting,match", [
    ("data.randaugment=[2, 50]", "magnitude in 0..30"),
    ("eval.capacity_factor=0", "eval.capacity_factor must be > 0"),
    ("eval.grid_capacity_factors=[0.5, 0]", "eval.grid_capacity_factors must all be > 0"),
    ("eval.grid_num_selected_experts=[0]", "grid_num_selected_experts"),
    ("optim.b2=1.0", "optim.b1 and optim.b2"),
    ("model.moe.routing.capacity_factor=.nan", "capacity_factor must be a finite"),
])
def test_every_section_is_validated_at_load(setting, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [setting])


def test_a_busy_work_dir_is_one_line_and_exit_code_2(tmp_path, capsys):
    from vmoe_torch.cli.main import main
    from vmoe_torch.storage.lock import WorkdirLock
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    try:
        code = main(["train", "--workdir", str(tmp_path), *[a for s in TINY for a in ("--set", s)]])
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1].startswith("vmoe train: error: Another run") and "Traceback" not in err


def _run(workdir, *extra, force=False):
    cfg = load_config(None, TINY + ["train.steps=12", "train.checkpoint_every=4", "train.keep_checkpoints=3",
                                    *extra])
    return Trainer(cfg, str(workdir), force=force).fit()


def test_a_damaged_checkpoint_is_named_and_lost_progress_is_not_overwritten(tmp_path, capsys):
    from vmoe_torch.utils.errors import RunRefused
    _run(tmp_path)
    (tmp_path / "checkpoints" / "step_00000012" / "state.json").unlink()
    (tmp_path / "eval.json").unlink()
    with pytest.warns(UserWarning, match="Skipping damaged checkpoint .*step_00000012.*no state.json"):
        assert _run(tmp_path)["status"] == "completed"  # resumed from step 8, with the warning
    assert "Resumed from step 8 of 12" in capsys.readouterr().err
    for ckpt in (tmp_path / "checkpoints").iterdir():
        (ckpt / "state.json").unlink(missing_ok=True)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RunRefused, match="metrics up to step 12 but resumes from step 0 .*damaged checkpoints"):
        _run(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # nothing lost
    with pytest.warns(UserWarning, match="Skipping damaged checkpoint"):
        with pytest.raises(FileNotFoundError, match="holds no checkpoint yet"):
            load_model(str(tmp_path))


def test_lowering_steps_on_a_finished_run_is_refused_and_the_record_stays_true(tmp_path):
    from vmoe_torch.utils.errors import RunRefused
    _run(tmp_path)
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(RunRefused, match="at step 12, past train.steps=6"):
        _run(tmp_path, "train.steps=6")
    assert (tmp_path / "config.yaml").read_text() == config


def test_defaults_are_announced(tmp_path, capsys):
    from vmoe_torch.cli.main import main
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.warns(UserWarning, match="is empty: every setting is a default"):
        load_config(str(empty))
    assert main(["train", "--workdir", str(tmp_path / "wd"), "--set", "optim.lr=.inf"]) == 2
    assert "no config file: every setting not given with --set is a default" in capsys.readouterr().err


def test_inputs_far_outside_the_model_range_warn_once():
    model = create_model("vmoe_mi4_every2_e8_k2").eval()
    with pytest.warns(UserWarning, match=r"reach \|x\| = 25\d.*expects pixels scaled to \[-1, 1\]"):
        model(torch.rand(8, 3, 32, 32) * 255)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.rand(8, 3, 32, 32) * 255)  # once per model
        create_model("vmoe_mi4_every2_e8_k2").eval()(torch.rand(8, 3, 32, 32) * 2 - 1)


def test_a_group_larger_than_the_batch_warns_with_one_process(tmp_path):
    cfg = load_config(None, TINY + ["model.moe.group_size=8000"])
    with pytest.warns(UserWarning, match=r"16 images \(272 tokens\) per micro-batch, fewer than group_size=8000"):
        trainer = Trainer(cfg, str(tmp_path))
        trainer._setup()


def test_eval_of_a_work_dir_without_a_checkpoint_says_so(tmp_path, capsys):
    from vmoe_torch.cli.main import main
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n')
    assert main(["eval", str(tmp_path)]) == 2
    assert "is a training work dir that holds no checkpoint yet" in capsys.readouterr().err


def _image_folder(root, per_class: int = 8):
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_an_unreadable_image_stops_the_run_naming_the_file_and_a_resume_gets_past_it(tmp_path):
    data = tmp_path / "data"
    _image_folder(data)
    bad = data / "train" / "b" / "3.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated
    sets = TINY + ["data.name=imagefolder", f"data.path={data}", "train.steps=4", "train.checkpoint_every=1"]
    with pytest.raises(ValueError, match=r"cannot read example \d+, file '.*3.png'.*rerun the same command"):
        Trainer(load_config(None, sets), str(tmp_path / "wd")).fit()
    bad.write_bytes(good)
    assert Trainer(load_config(None, sets), str(tmp_path / "wd")).fit()["status"] == "completed"


def test_a_full_disk_says_what_happened_and_that_the_run_can_resume(tmp_path):
    import errno

    from vmoe_torch.utils.errors import RunRefused
    trainer = Trainer(load_config(None, TINY + ["train.checkpoint_every=2"]), str(tmp_path))
    save = trainer.mode.save
    calls = []

    def full_after_the_first(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args, **kwargs)

    trainer.mode.save = full_after_the_first
    with pytest.raises(RunRefused, match=r"No space left on device while writing the checkpoint of step 4.*"
                                         r"step_00000002\) is intact.*rerun the same command"):
        trainer.fit()
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2]


def test_an_empty_cifar_directory_is_described_without_torchvision_download_advice(tmp_path):
    from vmoe_torch.data.pipeline import build_datasets
    cfg = load_config(None, ["data.name=cifar10", f"data.path={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        build_datasets(cfg.data)
    assert "download" not in str(err.value).replace("Nothing is downloaded", "")


def test_debug_shows_the_traceback_of_an_expected_error(tmp_path):
    from vmoe_torch.cli.main import main
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        main(["--debug", "train", "--workdir", str(tmp_path), "--set", "optim.lr=.inf"])
