"""`vmoe demo --quick` end to end (the path `make demo` takes), and CLI help."""
from __future__ import annotations

import json

import pytest

from vmoe_torch.cli.main import build_parser, main


@pytest.mark.slow
def test_quick_demo_writes_results(tmp_path):
    wd = tmp_path / "demo"
    assert main(["demo", "--workdir", str(wd), "--quick", "--set", "train.progress=false",
                 "--set", "train.threads=1"]) == 0
    res = json.load(open(wd / "results.json"))
    for key in ("moe", "dense"):
        assert 0.0 <= res[key]["test_accuracy"] <= 1.0
        assert res[key]["flops_per_image"] > 0 and res[key]["train_wall_clock_s"] > 0
    combos = {(r["capacity_factor"], r["num_selected_experts"], r["batch_priority"]) for r in res["capacity_sweep"]}
    assert {(c, k, b) for c in (0.25, 0.5, 1.0, 2.0) for k in (2, 1) for b in (False, True)} <= combos
    assert set(res["fewshot"]) == {"moe", "dense"} and "1" in res["fewshot"]["moe"]
    assert res["eval_batch_size"] > 0
    for png in ("capacity_sweep.png", "expert_load.png"):
        assert (wd / "analysis" / png).stat().st_size > 10_000
    analysis = json.load(open(wd / "analysis" / "analysis.json"))
    assert analysis["specialisation"] and analysis["capacity_sweep"]
    # The analysis CLI on the same work dir.
    assert main(["analyze", str(wd / "moe"), "--data", "digits", "--out", str(tmp_path / "a"),
                 "--set", "data.train_renders=1", "--set", "data.test_renders=1",
                 "--set", f"data.image_size={res['image_size']}", "--images", "2"]) == 0
    assert (tmp_path / "a" / "report.md").exists()


@pytest.mark.parametrize("cmd", ["train", "finetune", "eval", "fewshot", "analyze", "demo", "convert", "models"])
def test_help_is_available(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out
