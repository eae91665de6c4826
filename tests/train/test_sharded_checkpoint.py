"""The sharded (DCP) checkpoint layout in one process: restore into a fresh
model and optimizer, the streaming export to from_pretrained, load_model,
and the errors for a checkpoint of another model. (Writing and resuming it
across 1, 2 and 4 ranks, and kills during its save:
tests/parallel/test_torchrun.py.)"""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from vmoe_torch import from_pretrained
from vmoe_torch.models import create_model
from vmoe_torch.models.loading import consolidate_checkpoint, load_model
from vmoe_torch.storage.pretrained import config_json
from vmoe_torch.storage.workdir import is_sharded_checkpoint, list_checkpoints
from vmoe_torch.train.checkpoint import CorruptCheckpoint, restore, restore_latest, save_sharded_checkpoint


def _model(**kw):
    torch.manual_seed(0)
    return create_model("vmoe_mi4_every1_e8_k2", num_layers=2, layers=(0, 1), patch_size=8, image_size=32,
                        num_classes=10, group_size=32, **kw)


def _trained(dtype=torch.float32):
    model = _model().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        logits, metrics = model(torch.randn(4, 3, 32, 32, dtype=dtype), return_metrics=True)
        (logits.float().square().mean() + metrics["auxiliary_loss"]).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(workdir, model, opt, step=2):
    files = {"config.json": config_json(model.config)}
    return save_sharded_checkpoint(str(workdir), step, model, opt, {"note": "test"}, keep=2, files=files)


def test_restore_equals_the_saved_state_exactly(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, model, opt)
    assert is_sharded_checkpoint(path) and [s for s, _ in list_checkpoints(str(tmp_path))] == [2]
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = restore(path, fresh, fresh_opt)
    assert state["step"] == 2 and state["note"] == "test" and state["format"] == "dcp"
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for idx, s in saved["state"].items():
        for key, value in s.items():
            assert torch.equal(value, loaded["state"][idx][key]), (idx, key)
    # the next step is the same step
    x = torch.randn(4, 3, 32, 32)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        torch.manual_seed(1)
        m.set_noise_seed(5)
        logits, metrics = m(x, return_metrics=True)
        (logits.square().mean() + metrics["auxiliary_loss"]).backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_export_gives_the_same_logits(tmp_path, dtype):
    model, opt = _trained(dtype)
    path = _save(tmp_path / "wd", model, opt)
    out = tmp_path / "exported"
    consolidate_checkpoint(path, str(out))
    weights = out / "model.safetensors"
    with open(weights, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
    assert (8 + header_size) % 8 == 0
    with safe_open(str(weights), framework="pt") as f:  # safetensors itself reads what was streamed
        for name, value in model.state_dict().items():
            assert torch.equal(f.get_tensor(name), value), name
    assert json.loads((out / "config.json").read_text())["format"] == "vmoe-torch"
    model.eval()
    x = torch.randn(8, 3, 32, 32, dtype=dtype)
    expected = model(x)
    for other in (from_pretrained(str(out)), load_model(path), load_model(str(tmp_path / "wd"))):
        assert other.training is False
        assert torch.equal(other(x), expected)
    with pytest.raises(FileExistsError):
        consolidate_checkpoint(path, str(out))


def test_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, model, opt)
    other = _model(num_experts=4)
    with pytest.raises(ValueError, match="shape mismatches.*experts"):
        restore(path, other, torch.optim.AdamW(other.parameters()))


def test_unreadable_shard_falls_back_to_the_older_checkpoint(tmp_path):
    model, opt = _trained()
    _save(tmp_path, model, opt, step=2)
    older = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    newest = _save(tmp_path, model, opt, step=4)
    shard = os.path.join(newest, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(64)
    fresh = _model()
    with pytest.warns(UserWarning, match="Skipping unreadable checkpoint.*step_00000004"):
        state = restore_latest(str(tmp_path), fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert state is not None and state["step"] == 2
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, older[name]), name
    os.unlink(os.path.join(list_checkpoints(str(tmp_path))[0][1], ".metadata"))
    with pytest.raises(CorruptCheckpoint, match="No readable checkpoint"), pytest.warns(UserWarning):
        restore_latest(str(tmp_path), fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))


def test_consolidate_command_takes_a_work_dir_of_either_layout(tmp_path, capsys):
    from vmoe_torch.cli.main import main
    from vmoe_torch.train.checkpoint import save_checkpoint
    model, opt = _trained()
    full = tmp_path / "full"
    files = {"config.json": config_json(model.config)}
    save_checkpoint(str(full), 2, model.state_dict(), opt.state_dict(), {}, files=files)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    _save(tmp_path / "sharded", model, opt, step=3)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    for wd in ("full", "sharded"):
        assert main(["consolidate", str(tmp_path / wd), str(tmp_path / f"out-{wd}")]) == 0
        assert "wrote" in capsys.readouterr().out
    assert torch.equal(from_pretrained(str(tmp_path / "out-sharded"))(x), model(x))
    assert not torch.equal(from_pretrained(str(tmp_path / "out-full"))(x), model(x))  # the earlier weights
    assert main(["export-checkpoint", str(tmp_path / "sharded"), str(tmp_path / "out-full")]) == 2
    assert "already exists" in capsys.readouterr().err
