"""Sparse upcycling: experts are the dense MLP, the rest is copied, the MoE
can be forced to equal the dense model, and the result trains, resumes after
a kill and converts; bad sources fail clearly; the CLI writes atomically."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY_RUN

from vmoe_torch.upcycling import SourceError, dense_model, upcycle

timm = pytest.importorskip("timm")


def _timm_source(tmp_path, dim=192, heads=3):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    src = VisionTransformer(img_size=32, patch_size=8, embed_dim=dim, depth=12, num_heads=heads,
                            mlp_ratio=4.0, num_classes=10).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    # As on the Hub: timm's config.json beside the weights records the normalisation.
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    return src, str(path)


def _description():  # the source has ViT-Ti's shape (192-d, 12 blocks, 3 heads)
    return "ViT-Ti/8, E=4, K=2, Layers 1 3"


def test_experts_are_the_dense_mlp_and_everything_else_is_copied(tmp_path):
    _, path = _timm_source(tmp_path)
    dense = dense_model(path, num_heads=3)
    moe = upcycle(path, _description(), bfloat16_dispatch=False)
    assert sorted(moe.moe_layers()) == ["encoderblock_1", "encoderblock_3"]
    d, m = dense.state_dict(), moe.state_dict()
    for i in (1, 3):
        e = moe.blocks[i].mlp.experts
        for k in range(4):
            torch.testing.assert_close(e.w1[k], d[f"blocks.{i}.mlp.fc1.weight"].T, rtol=0, atol=0)
            torch.testing.assert_close(e.b1[k], d[f"blocks.{i}.mlp.fc1.bias"], rtol=0, atol=0)
            torch.testing.assert_close(e.w2[k], d[f"blocks.{i}.mlp.fc2.weight"].T, rtol=0, atol=0)
            torch.testing.assert_close(e.b2[k], d[f"blocks.{i}.mlp.fc2.bias"], rtol=0, atol=0)
    for name, value in d.items():
        if not any(name.startswith(f"blocks.{i}.mlp.") for i in (1, 3)):
            torch.testing.assert_close(m[name], value, rtol=0, atol=0, msg=name)
    assert moe.blocks[1].mlp.router.weight.abs().sum() > 0  # freshly initialised


def test_forced_dense_routing_equals_the_dense_model(tmp_path):
    src, path = _timm_source(tmp_path)
    dense = dense_model(path, num_heads=3)
    moe = upcycle(path, _description(), bfloat16_dispatch=False)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = dense(x)
        torch.testing.assert_close(ref, src(x), rtol=1e-5, atol=1e-5)
        # Every token to all E experts, nothing dropped: the gates sum to 1 over identical experts.
        with moe.routing(num_selected_experts=4, capacity_factor=4.0):
            torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)
        assert (moe(x) - ref).abs().max() > 1e-4  # at K=2 the MoE is not the dense model


def test_noise_seed_new_head_and_other_routers(tmp_path):
    _, path = _timm_source(tmp_path)
    dense = dense_model(path, num_heads=3)
    noisy = upcycle(path, _description(), noise_std=0.01, seed=3, num_classes=5)
    w1 = noisy.blocks[1].mlp.experts.w1
    base = dense.blocks[1].mlp.fc1.weight.T
    rel = ((w1 - base).pow(2).mean().sqrt() / base.pow(2).mean().sqrt()).detach()
    assert 0.005 < float(rel) < 0.02 and not torch.equal(w1[0], w1[1])
    torch.testing.assert_close(upcycle(path, _description(), noise_std=0.01, seed=3).blocks[1].mlp.experts.w1, w1)
    assert noisy.config.num_classes == 5 and float(noisy.head.weight.detach().abs().sum()) == 0.0
    ec = upcycle(path, _description(), router="expert_choice", capacity_factor=2.0)
    soft = upcycle(path, _description(), router="soft", num_slots=4, capacity_factor=None,
                   group_size=16)
    e3 = upcycle(path, "ViT-Ti/8, E=4, K=1, M=2, Layers 1 3")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert ec(x).shape == (2, 10) and soft(x).shape == (2, 10) and e3(x).shape == (2, 10)
    torch.testing.assert_close(soft.blocks[3].mlp.experts.b2[2], dense.blocks[3].mlp.fc2.bias)


def test_bad_targets_and_sources(tmp_path):
    _, path = _timm_source(tmp_path)
    with pytest.raises(SourceError, match="mismatched width"):
        upcycle(path, "ViT-S/8, E=4, K=2, Layers 1 3")
    assert upcycle(path, "E=4, K=2, Every 2").config.moe.layers == tuple(range(1, 12, 2))  # backbone read
    with pytest.raises(SourceError, match="Unknown option"):
        upcycle(path, "E=4, K=2, Evry 2")
    with pytest.raises(SourceError, match="no experts"):
        upcycle(path, "ViT-Ti/8")
    with pytest.raises(SourceError, match="already a V-MoE"):
        upcycle(upcycle(path, _description()).state_dict(), _description())


def _cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "vmoe_torch.cli.main", *args], capture_output=True,
                          text=True, timeout=300, check=check)


def test_cli_writes_from_pretrained_with_a_model_card_and_never_half(tmp_path):
    _, path = _timm_source(tmp_path)
    out = tmp_path / "out"
    _cli("upcycle", path, str(out), "--from", "timm", "--model", _description(), "--num-heads", "3",
         "--noise-std", "0.01", "--no-bfloat16-dispatch")
    from vmoe_torch import from_pretrained
    model = from_pretrained(str(out))
    assert model.config.moe.num_experts == 4
    card = (out / "README.md").read_text()
    assert "upcycled" in card.lower() and "dense.safetensors" in card and "timm" in card
    meta = json.loads((out / "config.json").read_text())
    assert meta["source"]["kind"] == "upcycled"
    # The source is recorded by name and content hash, never by a local path.
    import hashlib
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert meta["source"]["file"] == "dense.safetensors" and meta["source"]["sha256"] == digest
    assert str(tmp_path) not in card and str(tmp_path) not in (out / "config.json").read_text()
    assert digest in card
    # A bare file records no normalisation: the CLI asks for it, then takes it from flags.
    os.remove(tmp_path / "config.json")
    bare = _cli("upcycle", path, str(tmp_path / "bare"), "--model", "E=4, K=2, Every 2", check=False)
    assert bare.returncode != 0 and "--normalization" in bare.stderr and "dense.safetensors" in bare.stderr
    assert not (tmp_path / "bare").exists()
    _cli("upcycle", path, str(tmp_path / "bare"), "--model", "E=4, K=2, Every 2",
         "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")
    torch.testing.assert_close(from_pretrained(str(tmp_path / "bare")).blocks[0].attn.qkv.weight,
                               model.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    # A failing run leaves nothing behind.
    bad = _cli("upcycle", path, str(tmp_path / "bad"), "--from", "timm", "--model", "ViT-S/8, E=4, K=2, Every 2",
               "--normalization", "inception", check=False)
    assert bad.returncode != 0 and "mismatched width" in bad.stderr
    assert not (tmp_path / "bad").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bad")]


def test_native_round_trip_and_gelu_guard(tmp_path):
    """A vit_jax source (tanh GELU, eps 1e-6: the reference's conventions)
    upcycles, exports to vmoe's native format and reads back identically; a
    timm source (exact GELU) refuses to export instead of changing."""
    from conftest import MODELS

    from vmoe_torch.convert.reference import model_from_reference, model_to_reference
    moe = upcycle(str(MODELS / "j_vit_jax_npz_token" / "model.npz"), _target((1,), 4, 2 * 17),
                  noise_std=0.01)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    kwargs = model_to_reference(moe, str(tmp_path / "ckpt"), num_shards=2)
    again = model_from_reference(str(tmp_path / "ckpt"), kwargs)
    with torch.no_grad():
        torch.testing.assert_close(again(x), moe(x), rtol=0, atol=0)
    _, path = _timm_source(tmp_path)
    with pytest.raises(ValueError, match="GELU"):
        model_to_reference(upcycle(path, _description()), str(tmp_path / "ckpt2"))


@pytest.mark.slow
def test_upcycled_model_trains_and_resumes_after_sigkill(tmp_path):
    """`vmoe finetune --init UPCYCLED`: loss falls over a few dozen steps, and a
    run SIGKILLed after its first checkpoint resumes to the same losses."""
    from timm.models.vision_transformer import VisionTransformer

    from vmoe_torch import save_pretrained
    torch.manual_seed(0)
    src = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                            num_classes=10)
    save_pretrained(upcycle(src, _target((0, 1), 4, 2 * 17), read_options={"normalization": "inception"}),
                    str(tmp_path / "init"))
    sets = TINY_RUN + ["train.steps=30", "train.checkpoint_every=10", "optim.lr=0.001"]
    args = ["finetune", "--init", str(tmp_path / "init"), "--workdir"]

    def run(workdir, kill_after=None):
        cmd = [sys.executable, "-m", "vmoe_torch.cli.main", *args, str(workdir)]
        cmd += [a for s in sets for a in ("--set", s)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if kill_after is None:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=env)
            return
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None:
            if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def losses(workdir):
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if line.strip()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    run(tmp_path / "ref")
    ref = losses(tmp_path / "ref")
    first, last = sum(ref[s] for s in range(1, 6)) / 5, sum(ref[s] for s in range(26, 31)) / 5
    assert last < first - 0.05, (first, last)
    run(tmp_path / "killed", kill_after=True)
    run(tmp_path / "killed")
    assert losses(tmp_path / "killed") == ref


def _target(layers, experts, group_size):
    from vmoe_torch.models import MoeConfig
    from vmoe_torch.moe import RoutingConfig
    return MoeConfig(layers=layers, num_experts=experts, group_size=group_size,
                     routing=RoutingConfig(num_selected_experts=2, capacity_factor=1.05))


def test_package_level_entry_point(tmp_path):
    import vmoe_torch
    _, path = _timm_source(tmp_path)
    assert vmoe_torch.upcycle(path, _description()).config.moe.num_experts == 4
