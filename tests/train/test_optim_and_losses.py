from __future__ import annotations

import math

import pytest
import torch

from vmoe_torch import create_model
from vmoe_torch.config.experiment import OptimConfig, ScheduleConfig
from vmoe_torch.train.losses import sigmoid_xent, softmax_xent
from vmoe_torch.train.optim import build_optimizer, clip_grad_norm, learning_rate


def test_weight_decay_only_on_kernels():
    model = create_model("vmoe_mi4_every2_e8_k2", num_layers=2, layers=(1,))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "blocks.1.mlp.experts.w1" in names and "blocks.1.mlp.router.weight" in names
    assert "patch_embed.proj.weight" in names and "blocks.0.attn.qkv.weight" in names
    assert not any(n.endswith("bias") or "norm" in n or n in ("pos_embed", "cls_token") for n in names)
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["vmoe_mi4_every2_e8_k2", "vmoe_soft_mi4_half", "vmoe_eee_mi4_every2_e8_k1_m2",
                                  "vmoe_dense_mi4"])
def test_weight_decay_by_role_not_by_name(name):
    """Issue 14 #5: the expert biases b1 (E, H) / b2 (E, D) are matrices but
    biases; Soft MoE's slot parameters are not kernels either. Exactly the
    Linear/Conv weights, the expert kernels w1/w2 and the gating matrices are
    decayed, and the model's no_weight_decay() is the complement."""
    model = create_model(name)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {n for n, p in model.named_parameters() if any(p is q for q in opt.param_groups[0]["params"])}
    expected = {n for n, _ in model.named_parameters()
                if n.endswith(("experts.w1", "experts.w2", "router.weight"))
                or (n.endswith(".weight") and any(k in n for k in ("qkv", "proj", "fc1", "fc2", "head", "pre_logits")))}
    assert decayed == expected
    assert not any(n.endswith(("experts.b1", "experts.b2", "router.mu", "router.scale")) for n in decayed)
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters()} - decayed


def test_schedules():
    lin = ScheduleConfig(name="warmup_linear_decay", warmup_steps=10, end_lr=1e-5)
    assert math.isclose(learning_rate(0, 100, 1.0, lin), 0.1)
    assert math.isclose(learning_rate(9, 100, 1.0, lin), 1.0)
    assert math.isclose(learning_rate(100, 100, 1.0, lin), 1e-5)
    cos = ScheduleConfig(name="warmup_cosine_decay", warmup_steps=10, end_lr=0.0)
    assert math.isclose(learning_rate(55, 100, 1.0, cos), 0.5, abs_tol=1e-9)
    assert learning_rate(100, 100, 1.0, cos) < 1e-12


def test_losses_match_float64_recomputation():
    logits = torch.randn(6, 5)
    targets = torch.softmax(torch.randn(6, 5), -1)
    l64 = -(targets.double() * torch.log_softmax(logits.double(), -1)).sum(-1).mean()
    torch.testing.assert_close(softmax_xent(logits, targets).double(), l64, rtol=1e-6, atol=1e-7)
    onehot = torch.eye(5)[torch.randint(0, 5, (6,))]
    p = torch.sigmoid(logits.double())
    ref = -(onehot * p.log() + (1 - onehot) * (1 - p).log()).sum(-1).mean()
    torch.testing.assert_close(sigmoid_xent(logits, onehot).double(), ref, rtol=1e-6, atol=1e-7)


def test_global_norm_clipping():
    model = torch.nn.Linear(4, 3)
    model(torch.randn(2, 4)).square().sum().mul(100).backward()
    before = clip_grad_norm(model, 1.0)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert before > 1.0 and abs(float(after) - 1.0) < 1e-4
