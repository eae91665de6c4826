"""The auxiliary loss reaches the routers in loops that only backpropagate
their task loss (timm's train.py), exactly once, and its explicit use wins.

The reference gradient of every test is the one this library always gave:
`(task + model.auxiliary_loss).backward()` with the attachment switched off.
Tolerances: the same float32 terms summed in another order (rtol 1.3e-6)."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from vmoe_torch import WithAuxiliaryLoss, create_model

NAME = "vmoe_mi4_every2_e8_k2"


def _batch(b=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (b,), generator=g)


def _model(name=NAME, **kw):
    torch.manual_seed(0)
    return create_model(name, **kw).train()


def _grads(model, loss_of, forward=None):
    """Router and patch-embedding gradients of one step (noise seed fixed)."""
    model.zero_grad(set_to_none=True)
    model.set_noise_seed(1)
    x, y = _batch()
    out = (forward if forward is not None else model)(x)
    loss_of(out, y, model).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()
            if p.grad is not None and ("router" in name or "patch_embed" in name)}


def _reference(model, weight=1.0, divide=1.0):
    model.set_auxiliary_loss_gradient(False)
    try:
        return _grads(model, lambda out, y, m: (F.cross_entropy(out, y) + weight * m.auxiliary_loss) / divide)
    finally:
        model.set_auxiliary_loss_gradient(True)


def _assert_same(got, want):
    assert got.keys() == want.keys() and any("router" in k for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)


def _ce(out, y, model):  # noqa: ARG001 - timm's train.py: loss_fn(output, target)
    return F.cross_entropy(out, y)


def test_a_plain_task_loss_gives_the_router_the_gradient_of_task_plus_auxiliary():
    model = _model()
    want = _reference(model)
    _assert_same(_grads(model, _ce), want)
    model.set_auxiliary_loss_gradient(False)  # the opt-out: the task loss's gradient only
    without = _grads(model, _ce)
    router = "blocks.1.mlp.router.weight"
    assert (without[router] - want[router]).abs().max() > 1e-4 * want[router].abs().max()


@pytest.mark.parametrize("weight", [1.0, 0.5, 3.0])
def test_an_explicit_auxiliary_loss_counts_once_with_its_own_weight(weight):
    model = _model()
    got = _grads(model, lambda out, y, m: F.cross_entropy(out, y) + weight * m.auxiliary_loss)
    _assert_same(got, _reference(model, weight))


def test_with_auxiliary_loss_and_our_metrics_channel_count_once():
    model = _model()
    want = _reference(model)
    _assert_same(_grads(model, lambda out, y, m: WithAuxiliaryLoss(F.cross_entropy, m)(out, y)), want)

    def from_metrics(out, y, m):  # our trainer's way: forward(..., return_metrics=True)
        return F.cross_entropy(out, y) + m.metrics["auxiliary_loss"]
    _assert_same(_grads(model, from_metrics), want)


def test_logits_in_two_losses_and_a_logged_auxiliary_loss_still_count_it_once():
    model = _model()
    want = _reference(model, divide=1.0)

    def twice(out, y, m):
        logged = float(m.auxiliary_loss.detach())  # reading it for a log does not claim it
        assert logged > 0
        return 0.5 * F.cross_entropy(out, y) + 0.5 * F.cross_entropy(out, y)
    _assert_same(_grads(model, twice), want)


def test_a_scaled_loop_passes_its_factor():
    """Gradient accumulation over N micro-batches divides the loss by N."""
    model = _model()
    want = _reference(model, divide=4.0)
    model.set_auxiliary_loss_gradient(scale=0.25)
    _assert_same(_grads(model, lambda out, y, m: F.cross_entropy(out, y) / 4.0), want)
    with pytest.raises(ValueError, match="positive finite"):
        model.set_auxiliary_loss_gradient(scale=0.0)


def test_timm_keyword_sets_the_factor_for_scripts_without_another_door():
    """train.py --grad-accum-steps N divides its loss by N; --model-kwargs
    auxiliary_loss_gradient_scale=1/N keeps the two terms' ratio."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=10, auxiliary_loss_gradient_scale=0.25).train()
    got = _grads(model, lambda out, y, m: F.cross_entropy(out, y) / 4.0)  # the keyword's factor
    _assert_same(got, _reference(model, divide=4.0))
    off = timm.create_model(NAME, num_classes=10, auxiliary_loss_gradient_scale=0)
    assert off(torch.zeros(2, 3, 32, 32)).grad_fn is not None and off._aux_gradient_scale is None
    for bad in (-1, float("inf"), "half", True):
        with pytest.raises(ValueError, match="auxiliary_loss_gradient_scale must be a finite number"):
            timm.create_model(NAME, auxiliary_loss_gradient_scale=bad)


def test_float16_logits_warn_that_loss_scaling_misses_the_attached_gradient():
    model = _model()
    x, _ = _batch(2)
    with pytest.warns(UserWarning, match="GradScaler.*bfloat16"):
        with torch.autocast("cpu", dtype=torch.float16):
            model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.float16):
            model(x)  # once per model
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _model()(x)  # bfloat16 has no loss scaling: no warning


def test_gradient_checkpointing_and_bf16_autocast():
    model = _model()
    model.set_grad_checkpointing(True)
    _assert_same(_grads(model, _ce), _reference(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(model, _ce)
        want = _reference(model)
    _assert_same(got, want)  # the same bf16 computation; only the summation order differs


def test_values_are_unchanged_and_evaluation_has_no_attachment():
    model = _model()
    x, _ = _batch()
    model.set_noise_seed(1)
    plain = model(x)
    model.set_auxiliary_loss_gradient(False)
    model.set_noise_seed(1)
    torch.testing.assert_close(plain, model(x), rtol=0, atol=0)
    model.set_auxiliary_loss_gradient(True)
    assert "Attach" in type(plain.grad_fn).__name__
    with torch.no_grad():
        assert model(x).grad_fn is None
    model.eval()
    assert "Attach" not in type(model(x).grad_fn).__name__


def test_dense_models_have_nothing_to_attach():
    model = _model("vmoe_dense_mi4")
    x, _ = _batch()
    assert "Attach" not in type(model(x).grad_fn).__name__


def test_copy_pickle_and_state_dict_after_a_training_forward():
    """timm's ModelEmaV3 and torch's AveragedModel copy the model after a forward."""
    model = _model()
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    copied = copy.deepcopy(model)
    assert copied.metrics == {} and copied.blocks[1].metrics is None
    again = pickle.loads(pickle.dumps(model))
    assert again.metrics == {}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(copied.state_dict()[key], value, rtol=0, atol=0)
    torch.optim.swa_utils.AveragedModel(model)
    model.eval()
    torch.testing.assert_close(copied.eval()(x), model(x), rtol=0, atol=0)


def _one_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)


@pytest.mark.distributed
def test_ddp_and_fsdp_wrapped_models(tmp_path):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    model = _model()
    want = _reference(model)
    _one_process_group(tmp_path)
    try:
        ddp = DistributedDataParallel(model)
        _assert_same(_grads(model, _ce, forward=ddp), want)
        fsdp = fully_shard(_model())
        got = _grads(fsdp, _ce)
        _assert_same({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in got.items()}, want)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_compiled_training_step():
    torch._dynamo.reset()
    model = _model()
    want = _reference(model)
    _assert_same(_grads(model, _ce, forward=torch.compile(model)), want)


def test_warning_only_with_the_attachment_off():
    import warnings
    model = _model()
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # attached: the plain loop is correct, nothing to warn about
            F.cross_entropy(model(x), y).backward()
