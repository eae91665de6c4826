"""Exporting to vmoe's native format: refusals come before any write, a
failure part-way leaves nothing, and `vmoe export-native` writes a directory
that `vmoe convert` reads back to the same model."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vmoe_torch import from_pretrained
from vmoe_torch.config.descriptions import parse_description
from vmoe_torch.convert import model_to_reference, native
from vmoe_torch.models import VisionTransformerMoe


def _model(gelu="tanh"):
    cfg = parse_description("ViT-Mi/8, E=4, K=2, Last 1", num_classes=5)
    torch.manual_seed(0)
    cfg = type(cfg)(**{**cfg.__dict__, "gelu": gelu})
    return VisionTransformerMoe(cfg).eval()


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_refused_export_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="GELU"):
        model_to_reference(_model(gelu="erf"), str(tmp_path / "ckpt"))
    assert _files(tmp_path) == []
    bad = _model()
    with torch.no_grad():
        bad.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model_to_reference(bad, str(tmp_path / "ckpt"))
    assert _files(tmp_path) == []


def test_existing_checkpoint_needs_overwrite_and_stale_shards_go(tmp_path):
    prefix = str(tmp_path / "ckpt")
    model_to_reference(_model(), prefix, num_shards=3)
    before = {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)}
    with pytest.raises(FileExistsError, match="overwrite"):
        model_to_reference(_model(), prefix, num_shards=2)
    assert {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)} == before
    model_to_reference(_model(), prefix, num_shards=2, overwrite=True)
    assert _files(tmp_path) == ["ckpt.data-00000-of-00002", "ckpt.data-00001-of-00002", "ckpt.index"]


def test_a_failure_part_way_removes_what_it_wrote(tmp_path, monkeypatch):
    real, calls = native.atomic_write_bytes, []

    def failing(path, data, fsync=True):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data, fsync)
    monkeypatch.setattr(native, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="No space"):
        model_to_reference(_model(), str(tmp_path / "ckpt"), num_shards=3)
    assert _files(tmp_path) == []


def _cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "vmoe_torch.cli.main", *args], capture_output=True, text=True,
                          timeout=300, check=check)


def test_cli_export_native_round_trips_through_convert(tmp_path):
    model = _model()
    model.save_pretrained(str(tmp_path / "model"))
    _cli("export-native", str(tmp_path / "model"), str(tmp_path / "native"), "--num-shards", "2")
    assert _files(tmp_path / "native") == ["ckpt.data-00000-of-00002", "ckpt.data-00001-of-00002",
                                           "ckpt.index", "config.json"]
    _cli("convert", str(tmp_path / "native" / "ckpt"), str(tmp_path / "back"),
         "--config", str(tmp_path / "native" / "config.json"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(str(tmp_path / "back"))(x), model(x), rtol=0, atol=0)
    _model(gelu="erf").save_pretrained(str(tmp_path / "erf"))
    bad = _cli("export-native", str(tmp_path / "erf"), str(tmp_path / "erf_native"), check=False)
    assert bad.returncode == 2 and "GELU" in bad.stderr
    assert not [n for n in _files(tmp_path) if n.startswith((".", "erf_native"))]
