"""vmoe-torch models in a training loop written as timm's train.py writes
it: `loss_fn(output, target)`, `loss.backward()`, timm's optimizer factory,
EMA built after a forward, timm's loaders. The routers get the auxiliary
loss's gradient; E^3 models meet timm's (B, classes) contract; timm's
checkpoints validate; timm's own scripts run through `vmoe timm-run`."""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")

import timm  # noqa: E402
import timm.data  # noqa: E402
import timm.loss  # noqa: E402
import timm.optim  # noqa: E402
import timm.utils  # noqa: E402

import vmoe_torch  # noqa: E402,F401  (registers the models)
from vmoe_torch.cli.main import main  # noqa: E402
from vmoe_torch.data.digits import export_image_folder  # noqa: E402
from vmoe_torch.models import ensemble_log_probs  # noqa: E402

E3 = "vmoe_eee_mi4_every2_e8_k1_m2"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The bundled digits as an ImageFolder, cut to 8 images per class and split."""
    root = tmp_path_factory.mktemp("digits") / "tree"
    export_image_folder(str(root))
    for split in ("train", "validation"):
        for label in (root / split).iterdir():
            for extra in sorted(label.iterdir())[8:]:
                extra.unlink()
    return root


def _loader(model, root, training, batch=16):
    cfg = timm.data.resolve_data_config(model=model)
    ds = timm.data.create_dataset("", root=str(root), is_training=training)
    return timm.data.create_loader(ds, input_size=cfg["input_size"], batch_size=batch, is_training=training,
                                   no_aug=True, mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                                   interpolation=cfg["interpolation"], num_workers=0, use_prefetcher=False)


def _routers(model):
    return torch.cat([layer.router.weight.grad.flatten() for layer in model.moe_layers().values()])


@pytest.mark.parametrize("name", ["vmoe_mi4_every2_e8_k2", E3])
def test_a_train_py_loop_trains_the_routers_with_the_auxiliary_loss(name, digits):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    loader = _loader(model, digits / "train", True)
    images, target = next(iter(loader))
    loss_fn = timm.loss.LabelSmoothingCrossEntropy(0.1)
    model.train()
    model.set_noise_seed(5)
    loss = loss_fn(model(images), target)  # what train.py does
    loss.backward()
    got = _routers(model)
    model.zero_grad(set_to_none=True)
    model.set_auxiliary_loss_gradient(False)  # the same step with the auxiliary loss added by hand
    model.set_noise_seed(5)
    (loss_fn(model(images), target) + model.auxiliary_loss).backward()
    torch.testing.assert_close(got, _routers(model))  # float32 sums in another order
    model.set_auxiliary_loss_gradient(True)
    model.zero_grad(set_to_none=True)

    ema = timm.utils.ModelEmaV3(model, decay=0.9)  # built after a training forward: deepcopy works
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=3e-3, weight_decay=0.05)
    router_before = model.blocks[1].mlp.router.weight.detach().clone()
    for step, (images, target) in enumerate(loader):
        output = model(images)
        assert output.shape == (images.shape[0], 10)  # E^3 too: one row per image
        loss = loss_fn(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=step)
        if step == 3:
            break
    assert not torch.equal(model.blocks[1].mlp.router.weight, router_before)
    # validation as validate.py / train.py's validate(): logits -> timm.utils.accuracy
    for net in (model, ema.module):
        net.eval()
        with torch.no_grad():
            images, target = next(iter(_loader(net, digits / "validation", False, batch=32)))
            out = net(images)
            top1, _ = timm.utils.accuracy(out, target, topk=(1, 5))
            assert out.shape == (32, 10) and 0 <= float(top1) <= 100
            if name == E3:  # the reference's evaluation of the member rows, to float32 rounding
                torch.testing.assert_close(out, ensemble_log_probs(net(images, members=True), 2))


def test_e3_features_only_gives_one_batch_at_every_depth():
    model = timm.create_model(E3, features_only=True, out_indices=(0, 1, 3))
    feats = model(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert [tuple(f.shape) for f in feats] == [(4, 64, 8, 8)] * 3
    full = timm.create_model(E3).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    final, inter = full.forward_intermediates(x, indices=(3,))
    assert inter[0].shape[0] == 2 and final.shape[0] == 4  # the final tokens stay per member


def _timm_checkpoint(tmp_path, name, ema=True):
    """A checkpoint written by timm's own CheckpointSaver, as train.py does."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    model.train()
    F.cross_entropy(model(torch.rand(4, 3, 32, 32) * 2 - 1), torch.arange(4)).backward()
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3)
    optimizer.step()
    model_ema = timm.utils.ModelEmaV3(model, decay=0.5) if ema else None
    args = argparse.Namespace(model=name, num_classes=10, img_size=None, input_size=None, lr=1e-3)
    saver = timm.utils.CheckpointSaver(model, optimizer, args=args, model_ema=model_ema,
                                       checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=1.0)
    return model.eval(), tmp_path / "last.pth.tar"


def test_timm_validate_reads_timm_checkpoints(tmp_path, digits, capsys):
    model, ckpt = _timm_checkpoint(tmp_path, E3)
    model.save_pretrained(str(tmp_path / "dir"))
    results = {}
    for label, source in (("pth", str(ckpt)), ("dir", str(tmp_path / "dir"))):
        out = tmp_path / f"{label}.json"
        assert main(["timm-validate", str(digits), "--checkpoint", source, "-b", "256",
                     "--results-file", str(out)]) == 0
        results[label] = json.loads(out.read_text())
    assert results["pth"]["top1"] == results["dir"]["top1"] and results["pth"]["images"] == 80
    assert results["pth"]["routing"] == "batch-independent"
    assert main(["timm-validate", str(digits), "--checkpoint", str(ckpt), "--use-ema", "-b", "256"]) == 0
    capsys.readouterr()
    assert main(["timm-validate", str(digits), "--checkpoint", str(ckpt), "--model",
                 "vmoe_mi4_every2_e8_k2"]) == 2
    assert f"was trained as {E3}, not vmoe_mi4_every2_e8_k2" in capsys.readouterr().err


def test_a_pickled_module_is_refused_without_unpickling(tmp_path, digits, capsys):
    path = tmp_path / "whole.pth.tar"
    torch.save({"state_dict": timm.create_model("vmoe_dense_mi4")}, path)  # the objects themselves
    assert main(["timm-validate", str(digits), "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "whole.pth.tar" in err and "could run code" in err and "weights_only=False" not in err


def test_timm_run_runs_a_script_with_our_models_registered(tmp_path, capsys, monkeypatch):
    script = tmp_path / "validate.py"
    script.write_text(
        "import sys, timm\n"
        "m = timm.create_model(sys.argv[1], num_classes=3)\n"
        "print('argv', sys.argv[1:], type(m).__name__, m.num_classes)\n"
        "sys.exit(int(sys.argv[2]))\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["timm-run", str(script), "vmoe_mi4_every2_e8_k2", "0"]) == 0
    assert "argv ['vmoe_mi4_every2_e8_k2', '0'] VisionTransformerMoe 3" in capsys.readouterr().out
    assert main(["timm-run", str(script), "vmoe_mi4_every2_e8_k2", "3"]) == 3
    assert main(["timm-run", os.path.join(str(tmp_path), "none.py")]) == 2


def test_an_upcycled_model_goes_through_train_py_as_vmoe_pretrained(tmp_path, digits, capsys):
    """train.py --model vmoe_pretrained --pretrained --pretrained-path DIR:
    the architecture comes from DIR; timm-validate reads the checkpoint back
    through the path train.py recorded (or --pretrained-path)."""
    source = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=7)
    vmoe_torch.save_pretrained(vmoe_torch.upcycle(source, "E=4, K=2, Every 2"), str(tmp_path / "up"))
    model = timm.create_model("vmoe_pretrained", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay={"file": str(tmp_path / "up"), "num_classes": -1})
    assert model.num_classes == 10 and model.config.gelu == "erf"
    loss = F.cross_entropy(model.train()(torch.rand(4, 3, 32, 32) * 2 - 1), torch.arange(4))
    loss.backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in model.moe_layers().values())
    args = argparse.Namespace(model="vmoe_pretrained", num_classes=10, img_size=None, input_size=None,
                              pretrained_path=str(tmp_path / "up"))
    saver = timm.utils.CheckpointSaver(model, timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.1),
                                       args=args, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=1.0)
    out = tmp_path / "r.json"
    assert main(["timm-validate", str(digits), "--checkpoint", str(tmp_path / "last.pth.tar"),
                 "--results-file", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 80
    os.rename(tmp_path / "up", tmp_path / "moved")
    capsys.readouterr()
    assert main(["timm-validate", str(digits), "--checkpoint", str(tmp_path / "last.pth.tar")]) == 2
    assert "--pretrained-path" in capsys.readouterr().err
    assert main(["timm-validate", str(digits), "--checkpoint", str(tmp_path / "last.pth.tar"),
                 "--pretrained-path", str(tmp_path / "moved")]) == 0


def test_timm_validate_runs_at_a_budget_from_the_calibration(tmp_path, digits):
    from vmoe_torch.storage.calibration import Calibration, Point
    model = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=10).eval()
    own = {"num_selected_experts": 2, "capacity_factor": 1.05, "batch_priority": False, "dropless": False}
    cheap = {"num_selected_experts": 1, "capacity_factor": 0.5, "batch_priority": True, "dropless": False}
    model.calibration = Calibration([Point(own, 0.5, 100.0), Point(cheap, 0.4, 50.0)], reference=0)
    model.save_pretrained(str(tmp_path / "m"))
    out = tmp_path / "r.json"
    assert main(["timm-validate", str(digits), "--checkpoint", str(tmp_path / "m"), "--budget", "relative=0.6",
                 "--results-file", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["routing"] == "budget relative=0.6: K=1, C=0.5, BPR" and result["flops_per_image"] == 50.0
    assert main(["timm-validate", str(digits), "--checkpoint", str(tmp_path / "m"), "--budget", "relative=0.1"]) == 2
