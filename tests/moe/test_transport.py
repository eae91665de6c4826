"""The OT solvers on their own: projections against an independent float64
bisection, gradients against finite differences (float64, gradcheck), and
the implicit gradient of the entropic plan against the unrolled one at
convergence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_torch.moe.transport import kl_lbfgs_plan, l2_semi_dual_plan, simplex_projection, sinkhorn_plan

pytestmark = pytest.mark.numerics


def _bisection_projection(v: np.ndarray, k: int | None) -> np.ndarray:
    """argmin ||p - v|| over the simplex (restricted to the k largest
    entries): p = max(v - tau, 0) with tau found by bisection, float64."""
    out = np.zeros_like(v)
    keep = np.argsort(-v, kind="stable")[: (k or len(v))]
    w = v[keep]
    lo, hi = w.min() - 1.0, w.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        if np.maximum(w - tau, 0).sum() > 1:
            lo = tau
        else:
            hi = tau
    out[keep] = np.maximum(w - (lo + hi) / 2, 0)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=9), st.integers(1, 9))
def test_projection_is_the_simplex_minimiser(values, k):
    v = np.array(values, dtype=np.float64)
    k = min(k, len(v))
    for kk in (None, k):
        got = simplex_projection(torch.from_numpy(v), kk).numpy()
        assert got.min() >= 0 and abs(got.sum() - 1) < 1e-12
        assert (got != 0).sum() <= (kk or len(v))
        np.testing.assert_allclose(got, _bisection_projection(v, kk), atol=1e-9)


def _random(shape, seed, scale=1.0):
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


@pytest.mark.parametrize("k", [None, 2])
def test_projection_gradient_matches_finite_differences(k):
    v = _random((3, 5), 0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: simplex_projection(t, k), (v,))


@pytest.mark.parametrize("k", [None, 2])
def test_unrolled_adam_plan_gradient_matches_finite_differences(k):
    """The exact derivative of the computed plan, through every Adam step."""
    sim = torch.softmax(_random((2, 4, 6), 1, 2.0), -1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: l2_semi_dual_plan(s, 6 / 4, 1.0, k, maxiter=5, lr=0.1, gradient="unrolled"), (sim,))


def test_the_reference_l2_plan_is_a_constant():
    """As jaxopt's stop-gradient projections: no gradient through the plan."""
    sim = torch.softmax(_random((2, 4, 6), 1), -1).requires_grad_()
    assert not l2_semi_dual_plan(sim, 6 / 4, 1.0, None, maxiter=5, lr=0.1).requires_grad


def test_unrolled_sinkhorn_gradient_matches_finite_differences():
    logits = _random((2, 6, 3), 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinkhorn_plan(t, 10, gradient="unrolled"), (logits,))


def test_implicit_sinkhorn_gradient_is_the_converged_solutions():
    """At convergence the implicit gradient (one (E, E) solve) is the
    derivative of the OT solution: it matches finite differences of a
    converged solve, and the unrolled gradient of many iterations."""
    logits = _random((2, 6, 3), 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinkhorn_plan(t, 300, gradient="implicit"), (logits,),
                                    atol=1e-6, rtol=1e-4)
    up = _random((2, 6, 3), 4)
    implicit = torch.autograd.grad((sinkhorn_plan(logits, 300) * up).sum(), logits)[0]
    unrolled = torch.autograd.grad((sinkhorn_plan(logits, 300, gradient="unrolled") * up).sum(), logits)[0]
    torch.testing.assert_close(implicit, unrolled, rtol=1e-8, atol=1e-9)


def test_lbfgs_reaches_the_sinkhorn_solution_and_its_implicit_gradient():
    """L-BFGS stops where the semi-dual's changes reach float64 rounding
    (row sums within 1e-7 of 1 here, Sinkhorn's within 1e-15), so the two
    plans agree to the L-BFGS residual."""
    logits = _random((2, 6, 3), 5).requires_grad_()
    plan = kl_lbfgs_plan(logits, maxiter=200, tol=1e-12)
    residual = float((plan.detach().sum(2) - 1).abs().max())
    assert residual < 1e-7
    torch.testing.assert_close(plan, sinkhorn_plan(logits, 300), rtol=0, atol=10 * residual)
    up = _random((2, 6, 3), 6)
    got = torch.autograd.grad((plan * up).sum(), logits)[0]
    want = torch.autograd.grad((sinkhorn_plan(logits, 300, gradient="unrolled") * up).sum(), logits)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_gradient_mode_a_solver_lacks_is_refused():
    logits = _random((1, 4, 2), 7)
    with pytest.raises(ValueError, match="implicit"):
        l2_semi_dual_plan(logits, 2.0, 1.0, None, 3, 0.1, gradient="implicit")
    with pytest.raises(ValueError, match="unrolled"):
        kl_lbfgs_plan(logits, 5, gradient="unrolled")
