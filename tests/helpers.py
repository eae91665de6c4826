"""Tiny configurations and run helpers shared by the training, evaluation,
reliability and analysis tests."""
from __future__ import annotations

import json
import os
import sys

TINY = ["model.num_layers=2", "model.patch_size=8", "model.moe={layers: [0, 1], group_size: 34, num_experts: 4}",
        "data.train_renders=1", "data.test_renders=1", "data.batch_size=16",
        "data.eval_batch_size=32", "train.steps=8", "train.log_every=1", "train.checkpoint_every=4",
        "train.threads=1", "train.progress=false", "schedule.warmup_steps=2", "optim.lr=0.003"]
# The same run without the model settings: fine-tuning takes the architecture from its checkpoint.
TINY_RUN = [s for s in TINY if not s.startswith("model.")]


def train_cmd(workdir, steps: int, checkpoint_every: int, keep: int = 2, extra=()) -> list[str]:
    """`vmoe train` of the TINY config as a subprocess command."""
    sets = TINY + [f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}",
                   f"train.keep_checkpoints={keep}", *extra]
    return [sys.executable, "-m", "vmoe_torch.cli.main", "train", "--workdir", str(workdir),
            *[a for s in sets for a in ("--set", s)]]


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def logged_losses(workdir) -> dict[int, float]:
    """{step: loss} of WORKDIR/metrics.jsonl; a last line torn by a kill is
    skipped (the next run repairs it)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def perturb(module, seed=0):
    """Random non-trivial values everywhere (zero biases / unit norms would
    hide mistakes in a weight mapping); eval mode."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def calibrated_report(trained, out_dir) -> str:
    """`analyze` of the session's tiny trained model into `out_dir` with a
    three-point calibration (so report.html draws its curve); returns the
    page's path. The model's calibration is removed again afterwards."""
    from vmoe_torch.analysis.report import analyze
    from vmoe_torch.storage.calibration import Calibration, Point
    own = {"num_selected_experts": 2, "capacity_factor": 1.05, "batch_priority": False, "dropless": False}
    cheap = {**own, "num_selected_experts": 1, "capacity_factor": 0.5, "batch_priority": True}
    trained.model.calibration = Calibration([Point(own, 0.8, 2e6), Point(cheap, 0.7, 1e6),
                                             Point({**cheap, "batch_priority": False}, 0.6, 1e6)], reference=0)
    try:
        analyze(trained.model, trained.test_ds, str(out_dir), 32, capacity_factors=(0.25, 1.0), num_map_images=2)
    finally:
        trained.model.calibration = None
    return os.path.join(str(out_dir), "report.html")
