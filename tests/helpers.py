"""Tiny configurations shared by the training, evaluation and analysis tests."""
from __future__ import annotations

TINY_MODEL = ("model.overrides={num_layers: 2, layers: [0, 1], patch_size: 8, group_size: 34, "
              "num_experts: 4}")
TINY = [TINY_MODEL, "data.train_renders=1", "data.test_renders=1", "data.batch_size=16",
        "data.eval_batch_size=32", "train.steps=8", "train.log_every=1", "train.checkpoint_every=4",
        "train.threads=1", "train.progress=false", "schedule.warmup_steps=2", "optim.lr=0.003"]
