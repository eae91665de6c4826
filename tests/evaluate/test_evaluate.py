"""Evaluation over the routing grid and few-shot linear evaluation on tiny data."""
from __future__ import annotations

import numpy as np
import torch
from helpers import TINY

from vmoe_torch.data.pipeline import eval_batches
from vmoe_torch.evaluate import evaluate_classification, fewshot_evaluate, routing_grid
from vmoe_torch.evaluate.fewshot import ridge_fit


def test_routing_grid(trained):
    model, ds = trained.model, trained.test_ds
    rows = routing_grid(model, lambda: eval_batches(ds, 32), [0.25, 8.0], None, (False, True))
    assert len(rows) == 2 * 2 * 2
    assert {r["num_selected_experts"] for r in rows} == {2, 1}
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        if r["capacity_factor"] == 8.0:
            assert r["processed_fraction"] == 1.0
    low = [r for r in rows if r["capacity_factor"] == 0.25]
    assert all(r["processed_fraction"] < 1.0 for r in low)
    # The routing grid leaves the model's settings unchanged.
    assert all(layer.routing.capacity_factor == 1.05 for layer in model.moe_layers().values())


def test_classification_metrics(trained):
    res = evaluate_classification(trained.model, eval_batches(trained.test_ds, 32))
    assert res["num_examples"] == len(trained.test_ds)
    assert res["top1"] <= res["top5"] <= 1.0
    model = trained.model.eval()
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        pred = model(images.float() / 127.5 - 1).argmax(-1)
    labels = torch.ones(2, 10, dtype=torch.long)
    labels[1, pred[1]] = 0       # image 0: its top class is a true label; image 1: it is not
    multi = evaluate_classification(model, [(images, labels)], multilabel=True)
    assert multi == {"prec1": 0.5, "num_examples": 2}


def test_ridge_matches_float64_lstsq():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
    w = ridge_fit(x, y, 3, l2=0.5)
    xb = np.concatenate([x, np.ones((40, 1))], 1)
    t = -np.ones((40, 3))
    t[np.arange(40), y] = 1
    a = np.concatenate([xb, np.sqrt(0.5) * np.eye(7)])
    b = np.concatenate([t, np.zeros((7, 3))])
    np.testing.assert_allclose(w, np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-10)


def test_fewshot_on_separable_features():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 8)) * 5
    def make(n):
        y = rng.integers(0, 4, n)
        return centers[y] + rng.normal(size=(n, 8)), y
    trx, try_ = make(400)
    tex, tey = make(200)
    res = fewshot_evaluate(trx, try_, tex, tey, shots=(1, 5), seeds=3)
    assert set(res) == {"1", "5"}
    assert res["5"]["mean"] > 0.95 and res["5"]["std"] >= 0
    noise = fewshot_evaluate(rng.normal(size=(400, 8)), try_, rng.normal(size=(200, 8)), tey, shots=(5,), seeds=3)
    assert noise["5"]["mean"] < 0.5


def test_fewshot_cli_and_eval_cli(trained, tmp_path):
    from vmoe_torch.cli.main import main
    wd = trained.workdir
    sets = [a for o in TINY for a in ("--set", o)]
    assert main(["eval", wd, *sets, "--set", "eval.grid_capacity_factors=[0.5]", "--grid",
                 "--out", str(tmp_path / "e.json")]) == 0
    import json
    out = json.load(open(tmp_path / "e.json"))
    assert len(out["capacity_sweep"]) == 4 and out["eval_batch_size"] == 32
    assert main(["fewshot", wd, *sets, "--set", "fewshot.shots=[1,2]", "--set", "fewshot.seeds=2",
                 "--out", str(tmp_path / "f.json")]) == 0
    assert set(json.load(open(tmp_path / "f.json"))) == {"1", "2"}


def test_vmoe_eval_on_a_work_dir_uses_its_own_config(trained, tmp_path):
    import json

    from vmoe_torch.cli.main import main
    out = tmp_path / "eval.json"
    assert main(["eval", trained.workdir, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["eval_batch_size"] == trained.cfg.data.eval_batch_size == 32  # not the default 128
    assert result["test"]["num_examples"] == len(trained.test_ds)
