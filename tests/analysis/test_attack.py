"""PGD attacks and the routing-change statistics: a fixed-seed attack on a
tiny model is deterministic, stays within eps and raises the loss; the
selected-experts masks agree across dispatchers; the statistics follow the
reference's definitions."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vmoe_torch import create_model
from vmoe_torch.analysis.attack import attack_dataset, mean_iou, pgd_attack, record_selected, write_attack


def _model(**kw):
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every2_e8_k2", num_classes=10, **kw).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_a_fixed_seed_attack_is_deterministic_bounded_and_raises_the_loss():
    model = _model()
    x, y = _data()
    eps = 4 / 127.5
    a, b = pgd_attack(model, x, y, eps, 5), pgd_attack(model, x, y, eps, 5)
    assert torch.equal(a, b)
    # each of the 5 float32 additions to |x| < 2 rounds by at most one ulp (2**-22 there)
    assert float((a - x).abs().max()) <= eps + 5 * 2.0 ** -22
    with torch.no_grad():
        assert F.cross_entropy(model(a), y) > F.cross_entropy(model(x), y)
    assert all(p.grad is None for p in model.parameters())  # the model is not trained by the attack


def test_statistics_follow_the_reference_definitions():
    model = _model()
    x, y = _data()
    r = attack_dataset(model, [(x[:4], y[:4]), (x[4:], y[4:])], 2 / 127.5, 3)
    assert r["num_images"] == 8 and r["adversarial_loss"] > r["clean_loss"]
    assert set(r["routing_changes"]) == set(model.moe_layers())
    assert all(0 <= v <= 1 for v in r["routing_changes"].values())
    # eps = 0: the same routing and predictions; what remains is the reference's
    # convention that a token no expert processes (dropped in both runs) counts as changed
    zero = attack_dataset(model, [(x, y)], 0.0, 2)
    assert zero["prediction_changes"] == 0 and zero["clean_top1"] == zero["adversarial_top1"]
    with torch.no_grad(), record_selected(model) as masks:
        model(x)
    for name, runs in masks.items():
        unprocessed = float((~torch.cat(runs).any(-1)).float().mean())
        assert zero["routing_changes"][name] == pytest.approx(unprocessed, abs=1e-6), name


def test_iou_counts_tokens_without_experts_as_changed():
    a = torch.tensor([[[True, False], [False, False], [True, True]]])
    b = torch.tensor([[[True, False], [False, False], [True, False]]])
    torch.testing.assert_close(mean_iou(a, b), torch.tensor([(1 + 0 + 0.5) / 3]))


@pytest.mark.parametrize("routing", [dict(), dict(capacity_factor=0.5, batch_priority=True),
                                     dict(router="expert_choice"), dict(dropless=True)])
def test_selected_experts_agree_with_the_dense_dispatch_mask(routing):
    """The masks read from each fast dispatcher equal the einsum dispatcher's
    own (G, S, E, C) mask reduced over slots."""
    model = _model()
    x, _ = _data(4)
    with torch.no_grad(), model.routing(**routing):
        with record_selected(model) as fast:
            model(x)
        if routing.get("dropless"):
            for name, runs in fast.items():  # every top-K choice is kept: K experts per token
                assert all(int(m.sum(-1).min()) == int(m.sum(-1).max()) == 2 for m in runs), name
            return
        for layer in model.moe_layers().values():
            layer.router.dispatch_impl = "einsum"
        with record_selected(model) as dense:
            model(x)
    for name in fast:
        assert torch.equal(torch.cat(fast[name]), torch.cat(dense[name])), name


def test_soft_moe_reports_no_routing_change_and_dense_models_attack(tmp_path):
    soft = create_model("vmoe_soft_mi4_half", num_classes=10).eval()
    x, y = _data(4)
    assert attack_dataset(soft, [(x, y)], 1 / 127.5, 2)["routing_changes"] == {}
    dense = create_model("vmoe_dense_mi4", num_classes=10).eval()
    rows = [attack_dataset(dense, [(x, y)], 1 / 127.5, 2)]
    path = write_attack(rows, str(tmp_path), "dense")
    write_attack(rows, str(tmp_path), "other")
    assert set(json.loads(open(path).read())) == {"dense", "other"}
    assert (tmp_path / "attack.png").stat().st_size > 5000


def test_bad_requests_are_refused():
    model = _model()
    x, y = _data(2)
    with pytest.raises(ValueError, match="steps >= 1"):
        pgd_attack(model, x, y, 0.1, 0)
    with pytest.raises(ValueError, match="eval mode"):
        pgd_attack(model.train(), x, y, 0.1, 1)


def test_vmoe_attack_cli_and_the_report_section(trained, tmp_path):
    """`vmoe attack` on a trained work dir writes attack.json / attack.png,
    and the analysis report shows them."""
    from helpers import TINY

    from vmoe_torch.analysis.report import analyze
    from vmoe_torch.cli.main import main
    sets = [a for o in TINY for a in ("--set", o)]
    out = tmp_path / "report"
    assert main(["attack", trained.workdir, "--data", "digits", *sets, "--levels", "1", "4", "--steps", "2",
                 "--images", "16", "--label", "tiny", "--out", str(out)]) == 0
    rows = json.loads((out / "attack.json").read_text())["tiny"]
    assert [r["eps"] * 127.5 for r in rows] == pytest.approx([1, 4]) and rows[0]["num_images"] == 16
    analyze(trained.model, trained.test_ds, str(out), 32, capacity_factors=(1.0,), num_map_images=1)
    page = (out / "report.html").read_text()
    assert "Adversarial robustness (PGD)" in page and "tiny" in page
