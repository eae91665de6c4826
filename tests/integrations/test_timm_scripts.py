"""Training and validation with timm's components: the MoE task keeps the
auxiliary loss (the router's gradient includes it), and `vmoe timm-train` /
`vmoe timm-validate` run end to end on the bundled digits exported as an
ImageFolder."""
from __future__ import annotations

import csv
import json

import pytest
import torch

timm = pytest.importorskip("timm")

import vmoe_torch  # noqa: E402,F401  (registers the models)
from vmoe_torch.cli.main import main  # noqa: E402
from vmoe_torch.integrations.timm_task import MoeClassificationTask  # noqa: E402


def _router_grad(model, loss_of):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same router noise in every call
    loss_of().backward()
    return torch.cat([layer.router.weight.grad.flatten() for layer in model.moe_layers().values()])


@pytest.mark.parametrize("name", ["vmoe_mi4_every2_e8_k2", "vmoe_eee_mi4_every2_e8_k1_m2"])
def test_moe_task_adds_the_auxiliary_loss(name):
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    x, y = torch.rand(16, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (16,))
    task = MoeClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    torch.manual_seed(3)
    out = task(x, y)
    members = model.ensemble_size
    assert out["output"].shape[0] == 16 * members
    want = torch.nn.functional.cross_entropy(out["output"], y.repeat_interleave(members)) + model.auxiliary_loss
    torch.testing.assert_close(out["loss"], want, rtol=0, atol=0)
    assert float(out["aux_loss"]) > 0

    def task_loss():
        return task(x, y)["loss"]

    def ce_only():
        return torch.nn.functional.cross_entropy(model(x, members=True), y.repeat_interleave(members))

    def aux_only():
        model(x)
        return model.auxiliary_loss

    with_aux = _router_grad(model, task_loss)
    model.set_auxiliary_loss_gradient(False)  # the parts on their own
    without = _router_grad(model, ce_only)
    with pytest.warns(UserWarning, match="got no gradient"):  # the guard noticed the CE-only step
        aux = _router_grad(model, aux_only)
    assert aux.abs().max() > 0
    torch.testing.assert_close(with_aux, without + aux, rtol=1e-5, atol=1e-9)


def test_timm_train_then_validate_on_the_digits(tmp_path, capsys):
    data, out = tmp_path / "digits", tmp_path / "run"
    assert main(["export-digits", str(data)]) == 0
    assert sorted(p.name for p in (data / "train").iterdir()) == [str(i) for i in range(10)]
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in timm.create_model("vmoe_mi4_every2_e8_k2").state_dict().items()}
    assert main(["timm-train", str(data), "--model", "vmoe_mi4_every2_e8_k2", "--output", str(out),
                 "-b", "16", "--epochs", "2", "--max-steps", "6", "--lr", "3e-3", "--no-aug",
                 "--layer-decay", "0.75"]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 2 and all(int(r["train_steps"]) == 6 for r in rows)
    for r in rows:
        assert float(r["train_aux_loss"]) > 0
        assert float(r["train_loss"]) == pytest.approx(float(r["train_task_loss"]) + float(r["train_aux_loss"]),
                                                       rel=1e-5)
    trained = vmoe_torch.from_pretrained(str(out / "model"))
    router = "blocks.1.mlp.router.weight"
    assert not torch.equal(trained.state_dict()[router], initial[router])  # the router trained
    capsys.readouterr()
    results = tmp_path / "results.json"
    assert main(["timm-validate", str(data), "--checkpoint", str(out / "model"), "--results-file",
                 str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["images"] == 2695 and 0 <= got["top1"] <= got["top5"] <= 100
    assert json.loads(capsys.readouterr().out) == got


def test_timm_scripts_name_a_missing_split(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    assert main(["timm-validate", str(tmp_path), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "validation/" in capsys.readouterr().err
