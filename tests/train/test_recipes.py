"""Training aids and fine-tuning, each run for a few steps on tiny data."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY

from vmoe_torch.config import load_config
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


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """With routing groups inside each micro-batch unchanged (group = 2 images,
    micro-batch = 8 images), accumulating 2 x 8 equals one step on 16."""
    base = TINY + ["train.steps=2", "model.overrides.noise_std=0.0"]
    a = Trainer(load_config(None, base), str(tmp_path / "a"))
    a.fit()
    b = Trainer(load_config(None, base + ["train.grad_accum=2"]), str(tmp_path / "b"))
    b.fit()
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_finetune_new_head_resolution_and_freezing(tmp_path, trained):
    cfg = load_config(None, TINY + [
        "train.steps=2", f"finetune.init={trained.workdir}", "finetune.keep_representation=false",
        "finetune.freeze=[patch_embed, blocks.0]", "data.image_size=48",
        "model.overrides={capacity_factor: 1.5}"])
    ft = Trainer(cfg, str(tmp_path / "ft"))
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
        quick.append("model.overrides.group_size=400")  # 8 images x 25 tokens x 2 members
    trainer = Trainer(load_config(path, quick), str(tmp_path))
    summary = trainer.fit()
    assert summary["status"] == "completed"
    assert 0.0 <= trainer.evaluate()["top1"] <= 1.0
    saved = trainer.model.config
    again = Trainer(load_config(path, quick + ["train.steps=4"]), str(tmp_path))
    assert again.model.config == saved
    assert again.fit()["status"] == "completed"
