"""The optimal-transport routers inside models: training (gradients reach
the gating matrix as the reference's do), inference, switching routers on a
trained gating matrix, saving and loading, and settings checked when given."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmoe_torch import create_model, from_pretrained
from vmoe_torch.config.routing import OT_ROUTERS, RoutingConfig


def _model(router: str, **kw):
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every2_e8_k2", num_classes=10, router=router, **kw)
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would pass no gradient back
    model.set_noise_seed(3)
    return model


@pytest.mark.parametrize("router", OT_ROUTERS)
@pytest.mark.parametrize("impl", ["index", "einsum"])
def test_training_step_reaches_the_gating_matrix(router, impl):
    """With softmax combine weights (the reference's default) the router
    learns through them: every MoE layer's gating matrix gets a finite,
    non-zero gradient, and both dispatchers give the same loss."""
    model = _model(router).train()
    for layer in model.moe_layers().values():
        layer.router.dispatch_impl = impl
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    loss = F.cross_entropy(model(x), y) + model.auxiliary_loss
    loss.backward()
    for name, layer in model.moe_layers().items():
        grad = layer.router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    torch.manual_seed(1)
    other = _model(router).train()
    for layer in other.moe_layers().values():
        layer.router.dispatch_impl = "einsum" if impl == "index" else "index"
    torch.testing.assert_close(F.cross_entropy(other(x), y) + other.auxiliary_loss, loss, rtol=1e-5, atol=1e-6)


def test_plan_combine_weights_carry_the_chosen_gradient():
    """Combining with the plan: the L2 plan is a constant (the reference's
    stop-gradient), so the gating matrix gets no gradient; with
    ot_gradient='unrolled' it does. The entropic plan's implicit gradient
    reaches it too."""
    x, y = torch.randn(2, 3, 32, 32), torch.arange(2)

    def router_grad(router, **kw):
        model = _model(router, ot_softmax_combine=False, **kw).train()
        F.cross_entropy(model(x), y).backward()
        return next(iter(model.moe_layers().values())).router.weight.grad
    grad = router_grad("ot_sparse_ec")
    assert grad is None or grad.abs().sum() == 0
    assert router_grad("ot_sparse_ec", ot_gradient="unrolled").abs().sum() > 0
    assert router_grad("ot_kl_ec").abs().sum() > 0


def test_inference_and_switching_routers_share_the_gating_matrix():
    model = _model("top_experts").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        for router in OT_ROUTERS:
            with model.routing(router=router, capacity_factor=1.0):
                out = model(x)
                assert torch.isfinite(out).all() and not torch.equal(out, base), router
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_saved_and_loaded_with_its_settings(tmp_path):
    model = _model("ot_kl_tc", ot_maxiter=30, ot_lbfgs=False, importance_loss_weight=0.0).eval()
    model.save_pretrained(str(tmp_path / "m"))
    loaded = from_pretrained(str(tmp_path / "m")).eval()
    routing = loaded.config.moe.routing
    assert (routing.router, routing.ot_maxiter, routing.importance_loss_weight) == ("ot_kl_tc", 30, 0.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("changes, message", [
    (dict(router="top_experts", ot_maxiter=5), "optimal-transport routers"),
    (dict(router="ot_sparse_ec", ot_lbfgs=True), "ot_lbfgs applies to router 'ot_kl_tc'"),
    (dict(router="ot_sparse_ec", ot_gradient="implicit"), "entropic routers"),
    (dict(router="ot_kl_tc", ot_lbfgs=True, ot_gradient="unrolled"), "not available with ot_lbfgs"),
    (dict(router="ot_ksparse_tc", noise_std=1.0), "adds no noise"),
    (dict(router="ot_kl_ec", ot_maxiter=0), "ot_maxiter must be >= 1"),
    (dict(router="ot_kl_ec", ot_adam_lr=float("nan")), "ot_adam_lr"),
    (dict(router="ot_kl_ec", ot_gradient="magic"), "ot_gradient must be one of"),
    (dict(router="ot_kl_tc", dropless=True), "dropless applies to the top_experts router"),
])
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        RoutingConfig(**changes).validate(8)


def test_settings_are_written_only_when_used():
    """A config that does not use the OT settings writes none of them, so
    the files of existing models and runs stay as they were."""
    from vmoe_torch.config.typed import to_dict
    assert not [k for k in to_dict(RoutingConfig()) if k.startswith("ot_")]
    assert to_dict(RoutingConfig(router="ot_kl_tc", ot_maxiter=50))["ot_maxiter"] == 50


def test_through_timm_with_its_settings():
    timm = pytest.importorskip("timm")
    import vmoe_torch  # noqa: F401  (registers the architectures)
    model = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=10, router="ot_kl_tc", ot_maxiter=30)
    routing = model.config.moe.routing
    assert (routing.router, routing.ot_maxiter) == ("ot_kl_tc", 30)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
