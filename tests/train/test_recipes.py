"""Training aids and fine-tuning, each run for a few steps on tiny data."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY, TINY_RUN

from vmoe_torch.config import load_config
from vmoe_torch.data.pipeline import step_batches
from vmoe_torch.train.trainer import Trainer


@pytest.mark.parametrize("extra", [
    ["data.mixup_alpha=0.4", "data.randaugment=[2, 9]", "data.hflip=true"],
    ["train.bf16=true"],
    ["train.grad_accum=2", "train.loss=sigmoid_xent", "optim.name=sgd", "schedule.name=warmup_cosine_decay"],
])
def test_training_aids_run_and_learn_something(tmp_path, extra):
    cfg = load_config(None, TINY + ["train.steps=3"] + extra)
    summary = Trainer(cfg, str(tmp_path)).fit()
    assert summary["status"] == "completed"
    import json
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def _first_step_gradients(cfg, workdir) -> dict[str, torch.Tensor]:
    """The gradients the trainer's first step hands to the optimizer."""
    trainer = Trainer(cfg, str(workdir))
    workdir.mkdir()
    trainer._setup()
    grads: dict[str, torch.Tensor] = {}

    def capture(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.step = capture
    images, labels = next(iter(step_batches(trainer.train_ds, cfg.data.batch_size, cfg.data.seed, 0, 1)))
    trainer._train_step(0, images, labels, None)
    return grads


@pytest.mark.numerics
def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """With routing groups inside each micro-batch unchanged (group = 2 images,
    micro-batch = 8 images), the gradient of 2 accumulated micro-batches of 8
    equals that of one batch of 16.

    Gradients, not parameters after an Adam step, are compared: Adam divides
    by sqrt(v), so a near-zero gradient's last-bit noise becomes a full-size
    update. Tolerance: both sides sum the same per-token terms in another
    order and blocking (float32, ~10^3 terms per reduction), which differs by
    about sqrt(10^3) x 2^-24 ~ 2e-6 of the largest terms; 1e-5 of the
    largest gradient leaves a 5x margin, while a missing 1/accum (100%) or a
    changed routing group (~1e-2) is far above it."""
    base = TINY + ["train.steps=2", "model.moe.routing.noise_std=0.0", "optim.grad_clip_norm=null"]  # unclipped
    one = _first_step_gradients(load_config(None, base), tmp_path / "a")
    accumulated = _first_step_gradients(load_config(None, base + ["train.grad_accum=2"]), tmp_path / "b")
    scale = max(float(g.abs().max()) for g in one.values())
    assert scale > 0
    for name, g in one.items():
        torch.testing.assert_close(accumulated[name], g, rtol=0, atol=1e-5 * scale, msg=name)


def test_finetune_new_head_resolution_and_freezing(tmp_path, trained):
    cfg = load_config(None, TINY_RUN + [
        "train.steps=2", f"finetune.init={trained.workdir}", "finetune.keep_representation=false",
        "finetune.freeze=[patch_embed, blocks.0]", "data.image_size=48",
        "model.moe.routing.capacity_factor=1.5"])
    with pytest.warns(UserWarning, match=r"routing groups stay group_size=34 tokens \(0.919 images"):
        ft = Trainer(cfg, str(tmp_path / "ft"))  # 37 tokens per image at 48 px
    start = {n: p.detach().clone() for n, p in ft.model.named_parameters()}
    assert ft.model.config.image_size == (48, 48)
    assert ft.model.pos_embed.shape[1] == 1 + 6 * 6
    assert float(ft.model.head.weight.detach().abs().sum()) == 0.0
    assert all(layer.routing.capacity_factor == 1.5 for layer in ft.model.moe_layers().values())
    ft.fit()
    for n, p in ft.model.named_parameters():
        frozen = n.startswith(("patch_embed", "blocks.0"))
        assert torch.equal(p, start[n]) == frozen, n


@pytest.mark.parametrize("config", ["demo_soft_moe.yaml", "demo_eee.yaml"])
def test_soft_moe_and_e3_recipes_train_evaluate_and_resume(tmp_path, config):
    import pathlib
    path = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / config)
    quick = ["train.steps=3", "train.checkpoint_every=2", "data.train_renders=1", "data.test_renders=1",
             "data.batch_size=8", "data.eval_batch_size=64", "train.progress=false", "train.threads=1"]
    if config == "demo_eee.yaml":
        quick.append("model.moe.group_size=400")  # 8 images x 25 tokens x 2 members
    trainer = Trainer(load_config(path, quick), str(tmp_path))
    summary = trainer.fit()
    assert summary["status"] == "completed"
    assert 0.0 <= trainer.evaluate()["top1"] <= 1.0
    saved = trainer.model.config
    again = Trainer(load_config(path, quick + ["train.steps=4"]), str(tmp_path))
    assert again.model.config == saved
    assert again.fit()["status"] == "completed"
