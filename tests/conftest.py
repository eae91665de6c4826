"""Shared test helpers. Reference fixtures: tests/fixtures/reference (see ORIGIN.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
ROUTING = FIXTURES / "routing"
MODELS = FIXTURES / "models"
MODEL_CASES = sorted(p.name for p in MODELS.iterdir() if (p / "ckpt.index").exists())  # native checkpoints

# Two threads per test process; with several pytest-xdist workers, the cores
# are shared between them instead of oversubscribed.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // _WORKERS)))


def load_json(path: Path):
    with open(path) as f:
        return json.load(f)


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny V-MoE trained for 6 steps on the bundled digits (shared by the
    evaluation and analysis tests)."""
    from helpers import TINY

    from vmoe_torch.config import load_config
    from vmoe_torch.train.trainer import Trainer
    trainer = Trainer(load_config(None, TINY + ["train.steps=6"]), str(tmp_path_factory.mktemp("wd")))
    trainer.fit()
    return trainer
