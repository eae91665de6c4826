"""Routing statistics only when they are read: with `routing_metrics(False)`
the routers skip them, and nothing that trains changes (outputs, auxiliary
loss, gradients, and the trainer's logged records and weights to the bit)."""
from __future__ import annotations

import json

import pytest
import torch

from vmoe_torch import create_model
from vmoe_torch.moe.metrics_switch import metrics_enabled, routing_metrics


@pytest.mark.parametrize("routing", [dict(), dict(batch_priority=True, capacity_factor=0.5),
                                     dict(router="expert_choice"), dict(dropless=True),
                                     dict(router="ot_kl_tc"), dict(router="ot_ksparse_ec")])
def test_outputs_losses_and_gradients_are_unchanged(routing):
    def run(enabled):
        torch.manual_seed(0)
        model = create_model("vmoe_mi4_every2_e8_k2", num_classes=10, gshard_loss_weight=0.0, **routing).train()
        torch.nn.init.normal_(model.head.weight)
        model.set_noise_seed(1)
        with routing_metrics(enabled):
            logits = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
            aux = model.auxiliary_loss
        (logits.square().mean() + aux).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return logits.detach(), aux.detach(), grads, dict(model.metrics)
    on, off = run(True), run(False)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    assert all(torch.equal(a, b) for a, b in zip(on[2], off[2])) and len(on[2]) == len(off[2])
    assert len(off[3]) < len(on[3])  # the statistics were skipped
    assert metrics_enabled()


def test_soft_moe_skips_its_similarity_metrics():
    model = create_model("vmoe_soft_mi4_half", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        on = model(x)
        names_on = set(model.metrics)
        with routing_metrics(False):
            off = model(x)
        names_off = set(model.metrics)
    assert torch.equal(on, off)
    assert any("similarity" in n for n in names_on) and not any("similarity" in n for n in names_off)


def test_the_trainer_logs_the_same_records_and_weights(tmp_path, monkeypatch):
    """The trainer computes the statistics on logged steps only; forcing them
    on for every step changes no logged value and no weight."""
    from helpers import TINY

    from vmoe_torch.config import load_config
    from vmoe_torch.train import trainer as trainer_module
    from vmoe_torch.train.trainer import Trainer

    def train(workdir):
        cfg = load_config(None, TINY + ["train.steps=5", "train.log_every=2"])
        t = Trainer(cfg, str(workdir))
        t.fit()
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records], t.model.state_dict()
    lean_records, lean_state = train(tmp_path / "lean")
    monkeypatch.setattr(trainer_module, "routing_metrics", lambda enabled=True: routing_metrics(True))
    full_records, full_state = train(tmp_path / "full")
    assert lean_records == full_records and len(lean_records) == 3
    assert all(torch.equal(lean_state[k], full_state[k]) for k in lean_state)
