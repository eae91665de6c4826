"""`train.compile: true`: the training forward is compiled with
fullgraph=True, dynamic=True; losses follow the eager run's, and the graph is
not recompiled from step to step (a new noise seed every step is data).

The run uses the aot_eager backend: the whole capture (dynamo without graph
breaks, AOT autograd of forward and backward) without inductor's C++ code
generation, which takes minutes on 2 cores; inductor's numerics are covered
at inference in tests/integrations/test_compile.py and for the layer in
training in tests/moe/test_noise.py."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from helpers import TINY, logged_losses

from vmoe_torch.config import load_config
from vmoe_torch.train.trainer import Trainer

pytestmark = pytest.mark.slow


def _run(tmp_path, name, extra=()):
    cfg = load_config(None, TINY + ["train.steps=6", "train.checkpoint_every=6", *extra])
    Trainer(cfg, str(tmp_path / name)).fit()
    return logged_losses(tmp_path / name)


def test_compiled_training_follows_eager_without_recompiling(tmp_path):
    eager = _run(tmp_path, "eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation fails the run
        compiled = _run(tmp_path, "compiled", ["train.compile=true", "train.compile_backend=aot_eager"])
    assert sorted(compiled) == sorted(eager) == list(range(1, 7))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-6), step
