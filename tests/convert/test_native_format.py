"""The native-format reader/writer, exports and their failure modes."""
from __future__ import annotations

import json
import os
import shutil

import msgpack
import numpy as np
import pytest
import torch
from conftest import MODELS

from vmoe_torch import create_model, from_pretrained, save_pretrained
from vmoe_torch.cli.main import main as cli
from vmoe_torch.convert import (
    CheckpointError,
    load_reference_config,
    model_from_reference,
    model_to_reference,
    read_reference_checkpoint,
    write_reference_checkpoint,
)
from vmoe_torch.convert.native import read_index

CASE_B = MODELS / "b_token_repr_e4_k2_bpr_drop"


def _copy_ckpt(case_dir, tmp_path):
    for f in case_dir.iterdir():
        if f.name.startswith("ckpt"):
            shutil.copy(f, tmp_path / f.name)
    return str(tmp_path / "ckpt")


def test_multi_chunk_checkpoint_is_really_chunked():
    count, leaves = read_index(str(MODELS / "c_gap_sincos_e4_k1_lowcap" / "ckpt"))
    assert count == 2
    assert max(len(info.slices) for _, info in leaves) > 1
    assert len({s for _, info in leaves for s in info.shards}) == 2


@pytest.mark.parametrize("num_shards,max_chunk", [(1, None), (3, 512), (4, 64)])
def test_native_round_trip_identical_arrays(tmp_path, num_shards, max_chunk):
    params = read_reference_checkpoint(str(CASE_B / "ckpt"))
    prefix = str(tmp_path / "out")
    write_reference_checkpoint(prefix, params, num_shards=num_shards, max_chunk_bytes=max_chunk,
                               expert_axis_chunks=2)
    back = read_reference_checkpoint(prefix)
    assert set(back) == set(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
        assert back[k].dtype == params[k].dtype
    assert len(read_index(prefix)[1]) == len(params)


def test_export_model_to_native_and_back(tmp_path):
    model = create_model("vmoe_mi4_every2_e8_k2", num_layers=2, layers=(1,), classifier="map",
                         position_emb="learned").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    kwargs = model_to_reference(model, str(tmp_path / "ckpt"), num_shards=2, max_chunk_bytes=4096)
    back = model_from_reference(str(tmp_path / "ckpt"), kwargs)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_safetensors_round_trip_identical_outputs(tmp_path):
    d = CASE_B
    model = model_from_reference(str(d / "ckpt"), load_reference_config(str(d / "config.json")))
    save_pretrained(model, str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Router `top_experts`, K = 2" in card and "Batch Priority Routing on" in card
    back = from_pretrained(str(tmp_path / "m"))
    x = torch.from_numpy(np.load(d / "images.npy")).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    meta = json.load(open(tmp_path / "m" / "config.json"))
    assert meta["format"] == "vmoe-torch" and meta["model"]["moe"]["num_experts"] == 4
    with pytest.raises(FileExistsError):
        save_pretrained(model, str(tmp_path / "m"))
    save_pretrained(model, str(tmp_path / "m"), overwrite=True)


def test_missing_shard(tmp_path):
    prefix = _copy_ckpt(CASE_B, tmp_path)
    os.unlink(prefix + ".data-00002-of-00004")
    with pytest.raises(CheckpointError, match="missing"):
        read_reference_checkpoint(prefix)


def test_truncated_shard(tmp_path):
    prefix = _copy_ckpt(CASE_B, tmp_path)
    path = prefix + ".data-00001-of-00004"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_reference_checkpoint(prefix)


def test_corrupted_index(tmp_path):
    prefix = _copy_ckpt(CASE_B, tmp_path)
    open(prefix + ".index", "wb").write(b"\x93not an index at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_reference_checkpoint(prefix)
    open(prefix + ".index", "wb").write(msgpack.packb({"version": "1999", "shard_count": 1, "index": {}}))
    with pytest.raises(CheckpointError, match="version"):
        read_reference_checkpoint(prefix)


def test_shard_missing_a_chunk_is_detected(tmp_path):
    params = {"a/kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(2, np.float32)}
    prefix = str(tmp_path / "x")
    write_reference_checkpoint(prefix, params, num_shards=1)
    doc = msgpack.unpackb(open(prefix + ".data-00000-of-00001", "rb").read(), raw=False, strict_map_key=False)
    doc.pop("1")
    open(prefix + ".data-00000-of-00001", "wb").write(msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(CheckpointError, match="lacks chunks"):
        read_reference_checkpoint(prefix)


def test_config_that_does_not_match_arrays(tmp_path):
    kwargs = load_reference_config(str(CASE_B / "config.json"))
    kwargs["encoder"]["mlp_dim"] = 128
    with pytest.raises(ValueError, match="shape mismatches"):
        model_from_reference(str(CASE_B / "ckpt"), kwargs)
    kwargs = load_reference_config(str(CASE_B / "config.json"))
    kwargs["encoder"]["moe"]["layers"] = [1]
    with pytest.raises(ValueError, match="not in the model"):
        model_from_reference(str(CASE_B / "ckpt"), kwargs)
    kwargs = load_reference_config(str(CASE_B / "config.json"))
    kwargs["encoder"]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        model_from_reference(str(CASE_B / "ckpt"), kwargs)


def test_cli_convert_and_its_errors(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = str(CASE_B / "config.json")
    assert cli(["convert", str(CASE_B / "ckpt"), str(out), "--config", cfg]) == 0
    assert from_pretrained(str(out)).config.moe.routing.batch_priority
    assert cli(["convert", str(CASE_B / "ckpt"), str(out), "--config", cfg]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["convert", str(CASE_B / "ckpt"), str(out), "--config", cfg, "--overwrite"]) == 0
    # A failing conversion leaves nothing at OUT_DIR.
    prefix = _copy_ckpt(CASE_B, tmp_path)
    os.unlink(prefix + ".data-00003-of-00004")
    bad_out = tmp_path / "bad"
    assert cli(["convert", prefix, str(bad_out), "--config", cfg]) == 2
    assert not bad_out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_released_registry():
    from vmoe_torch.convert import config_from_reference
    from vmoe_torch.convert.released import RELEASED, released_config
    cfg = config_from_reference(released_config("vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012"),
                                image_size=384)
    assert cfg.moe.layers == (1, 3, 5, 7, 9, 11) and cfg.moe.group_size == 8 * 577
    assert cfg.moe.routing.bfloat16_dispatch and cfg.moe.routing.capacity_factor == 1.5
    assert RELEASED["vmoe_s32_last2_ilsvrc2012_randaug_light1"].expected["ilsvrc2012_test"] == 73.1
    assert all(c.supported for c in RELEASED.values())
    e3 = config_from_reference(released_config("eee_s32_last2_ilsvrc2012_ft_cifar100"), image_size=128)
    assert e3.moe.ensemble_size == 2 and e3.moe.routing.num_selected_experts == 1
    assert e3.moe.group_size == 8 * 17 * 2 and e3.moe.layers == (5, 7)
    with pytest.raises(ValueError, match="Unknown released"):
        released_config("eee_nope")


def test_dict_level_mapping_matches_the_streaming_loader():
    from vmoe_torch.convert.mapping import reference_to_torch
    model = model_from_reference(str(CASE_B / "ckpt"), load_reference_config(str(CASE_B / "config.json")))
    mapped = reference_to_torch(read_reference_checkpoint(str(CASE_B / "ckpt")))
    state = model.state_dict()
    assert set(mapped) == set(state)
    for k, v in mapped.items():
        np.testing.assert_array_equal(v, state[k].numpy(), err_msg=k)


def test_nonfinite_weights_are_refused_with_their_name(tmp_path):
    """The native format has no checksum: flipped bytes that decode to NaN are
    caught per array (and can be let through on purpose)."""
    from vmoe_torch.convert import model_from_reference
    from vmoe_torch.convert.native import read_reference_checkpoint, write_reference_checkpoint
    d = CASE_B
    params = read_reference_checkpoint(str(d / "ckpt"))
    params["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"][2, 3, 4] = np.nan
    write_reference_checkpoint(str(tmp_path / "ckpt"), params, num_shards=2)
    kwargs = load_reference_config(str(d / "config.json"))
    with pytest.raises(ValueError, match="encoderblock_1/Moe/Mlp/Dense_0/kernel.*allow_nonfinite"):
        model_from_reference(str(tmp_path / "ckpt"), kwargs)
    model = model_from_reference(str(tmp_path / "ckpt"), kwargs, allow_nonfinite=True)
    assert torch.isnan(model.blocks[1].mlp.experts.w1).any()
