"""Optimal-transport solvers of the sparsity-constrained OT routers (Liu,
Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport", 2022), pure
and batched over routing groups.

Every plan transports mass 1 from each of the S tokens to S/E on each of the
E experts of a group. The reference solves these with jaxopt and ott-jax;
what matters for parity is each solver's exact iteration, which is written
out here:

- `l2_semi_dual_plan`: squared-L2-regularised OT in the semi-dual
  (Blondel et al. 2018, eq. 10), optionally with at most k non-zeros per
  column, solved by Adam from zero duals for at most `maxiter` steps (fewer
  when the gradient norm of the last step is <= `tol`), as jaxopt's
  OptaxSolver does. The defaults (20 steps) are far from converged, so the
  plan is that of these steps, not of the OT optimum.
- `sinkhorn_plan`: entropic OT (epsilon = 1) by Sinkhorn's scaling
  iterations, as ott-jax's `sinkhorn(lse_mode=False)`.
- `kl_lbfgs_plan`: the same entropic problem in its semi-dual, solved to a
  tolerance by L-BFGS (torch.optim.LBFGS with a strong-Wolfe line search).

Gradients (`gradient=`):
- "none": the plan is a constant. This is the reference's L2 plans: jaxopt
  computes them from `stop_gradient`-ed projections (Danskin's theorem), so
  the router learns only through the softmax combine weights.
- "unrolled": autograd through every iteration (the exact derivative of the
  computed plan; memory grows with the steps).
- "implicit": the entropic plans only, as the reference's default
  (`use_implicit_differentiation=True`): the derivative of the OT solution
  through its optimality conditions at the plan reached (`_EntropicImplicit`),
  which costs one (E, E) solve per group instead of storing the iterations.

Axis legend: G groups, S tokens per group, E experts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .routing import sorted_top_k

GRADIENTS = ("none", "unrolled", "implicit")
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8


def simplex_projection(v: Tensor, k: Optional[int] = None) -> Tensor:
    """Euclidean projection of each row onto the probability simplex.

    Args:
      v: (..., n).
      k: with k < n, the projection of the row's k largest entries only
        (ties: the lower index), every other entry 0 (at most k non-zeros,
        jaxopt's `projection_sparse_simplex`).
    Returns:
      (..., n), non-negative rows summing to 1. Differentiable (the support
      is piecewise constant: the Jacobian is that of jaxopt's custom JVP).
    """
    n = v.shape[-1]
    idx: Optional[Tensor] = None
    if k is None or k >= n:
        u = torch.sort(v, dim=-1, descending=True).values
    else:
        u, idx = sorted_top_k(v, k)
    m = u.shape[-1]
    cs = u.cumsum(-1)
    ind = torch.arange(1, m + 1, device=v.device, dtype=v.dtype)
    support = (1 / ind + (u - cs / ind)) > 0
    r = support.sum(-1, keepdim=True)                     # >= 1: the first entry always qualifies
    rf = r.to(v.dtype)
    cut = cs.gather(-1, r - 1) / rf
    if idx is None:
        return torch.relu(1 / rf + (v - cut))
    top = torch.relu(1 / rf + (u - cut))
    return torch.zeros_like(v).scatter(-1, idx, top)


def l2_semi_dual_plan(sim: Tensor, column_mass: float, dual_mass: float, k: Optional[int],
                      maxiter: int, lr: float, tol: float = 1e-3, gradient: str = "none") -> Tensor:
    """Squared-L2 OT between `dual` entries (mass `dual_mass` each) and
    columns (mass `column_mass` each), semi-dual, by Adam.

    Args:
      sim: (G, n, m) similarity; row j holds column j's similarities to the
        m dual entries (the reference's sim[:, j]).
      k: at most k non-zeros per column (None: no limit).
      maxiter, lr, tol: Adam's steps (at most), learning rate, and the
        gradient norm at or below which a group stops (after its step).
    Returns:
      (G, n, m) plan; row j sums to `column_mass` exactly, the dual sums
      (over n) only approximately to `dual_mass`.

    The reference's experts-choose routers call this with the tokens as the
    dual side (n = E columns of mass S/E over m = S tokens); the
    tokens-choose one with the experts as the dual side (n = S tokens of
    mass 1 over m = E experts).
    """
    _check_gradient(gradient, ("none", "unrolled"))
    with torch.set_grad_enabled(gradient == "unrolled" and torch.is_grad_enabled()):
        sim = sim if gradient == "unrolled" else sim.detach()
        groups, _, m = sim.shape
        alpha = sim.new_zeros(groups, m)
        mom, vel = torch.zeros_like(alpha), torch.zeros_like(alpha)
        active = torch.ones(groups, 1, dtype=torch.bool, device=sim.device)
        b1, b2 = torch.tensor(_ADAM_B1, dtype=sim.dtype), torch.tensor(_ADAM_B2, dtype=sim.dtype)
        for step in range(1, maxiter + 1):
            g = _l2_plan(alpha, sim, column_mass, k).sum(1) - dual_mass   # the semi-dual's gradient
            mom_new = (1 - _ADAM_B1) * g + _ADAM_B1 * mom
            vel_new = (1 - _ADAM_B2) * (g * g) + _ADAM_B2 * vel
            m_hat = mom_new / (1 - b1 ** step)
            v_hat = vel_new / (1 - b2 ** step)
            alpha_new = alpha + -lr * (m_hat / (torch.sqrt(v_hat) + _ADAM_EPS))
            alpha = torch.where(active, alpha_new, alpha)
            mom, vel = torch.where(active, mom_new, mom), torch.where(active, vel_new, vel)
            active = active & (torch.linalg.vector_norm(g, dim=-1, keepdim=True) > tol)
        return _l2_plan(alpha, sim, column_mass, k)


def _l2_plan(alpha: Tensor, sim: Tensor, column_mass: float, k: Optional[int]) -> Tensor:
    """(G, m) duals, (G, n, m) -> (G, n, m): column_mass * proj((alpha + sim) / column_mass)."""
    return simplex_projection((alpha.unsqueeze(1) + sim) / column_mass, k) * column_mass


def sinkhorn_plan(logits: Tensor, iterations: int, gradient: str = "implicit") -> Tensor:
    """Entropic OT plan of (G, S, E) logits (cost = -logits, epsilon = 1):
    tokens send 1, experts receive S/E.

    With K = exp(logits), u = 1 (S), v = 1 (E), `iterations` times
    v = (S/E) / (K^T u), u = 1 / (K v); the plan is exp(log u + log v +
    logits), strictly positive. With 0 iterations it is exp(logits).
    Returns (G, S, E).
    """
    _check_gradient(gradient, GRADIENTS)
    if gradient == "implicit" and iterations > 0 and torch.is_grad_enabled() and logits.requires_grad:
        return _EntropicImplicit.apply(logits, iterations)
    with torch.set_grad_enabled(gradient != "none" and torch.is_grad_enabled()):
        return _sinkhorn(logits if gradient != "none" else logits.detach(), iterations)


def _sinkhorn(logits: Tensor, iterations: int) -> Tensor:
    groups, size, experts = logits.shape
    kernel = torch.exp(logits)
    u = logits.new_ones(groups, size)
    v = logits.new_ones(groups, experts)
    for _ in range(iterations):
        v = (size / experts) / torch.einsum("gse,gs->ge", kernel, u)
        u = 1.0 / torch.einsum("gse,ge->gs", kernel, v)
    return torch.exp(torch.log(u).unsqueeze(-1) + torch.log(v).unsqueeze(1) + logits)


def kl_lbfgs_plan(logits: Tensor, maxiter: int, tol: float = 1e-3, gradient: str = "implicit") -> Tensor:
    """The entropic plan of `sinkhorn_plan`, from the semi-dual
    min_alpha sum_j b_j logsumexp_i(alpha_i + logits_ij) - sum_i alpha_i
    (b_j = S/E) solved by L-BFGS (at most `maxiter` iterations; stops when
    the largest gradient entry is <= `tol`): plan_ij = b_j softmax_i(alpha +
    logits[:, j]). Columns sum to S/E exactly, rows to 1 up to the
    tolerance. (G, S, E) -> (G, S, E).

    The groups are solved as one problem (their objectives add up, so the
    solution is each group's); torch's L-BFGS checks convergence on the host.
    """
    if gradient == "unrolled":
        raise ValueError("L-BFGS has no unrolled gradient here: use gradient='implicit' (the reference's) "
                         "or 'none'.")
    _check_gradient(gradient, GRADIENTS)
    alpha = _lbfgs_duals(logits.detach(), maxiter, tol)
    if gradient == "implicit" and torch.is_grad_enabled() and logits.requires_grad:
        return _EntropicImplicit.apply(logits, 0, alpha)
    return _semi_dual_entropic_plan(alpha, logits.detach())


def _semi_dual_entropic_plan(alpha: Tensor, logits: Tensor) -> Tensor:
    size, experts = logits.shape[1:]
    return torch.softmax(alpha.unsqueeze(-1) + logits, dim=1) * (size / experts)


def _lbfgs_duals(logits: Tensor, maxiter: int, tol: float) -> Tensor:
    groups, size, experts = logits.shape
    alpha = torch.zeros(groups, size, dtype=logits.dtype, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([alpha], lr=1, max_iter=maxiter, max_eval=25 * maxiter, tolerance_grad=tol,
                            tolerance_change=0.0,
                            history_size=10, line_search_fn="strong_wolfe")
    mass = size / experts

    def closure() -> Tensor:
        opt.zero_grad()
        value = (mass * torch.logsumexp(alpha.unsqueeze(-1) + logits, dim=1)).sum() - alpha.sum()
        value.backward()
        return value
    with torch.enable_grad():
        opt.step(closure)
    return alpha.detach()


class _EntropicImplicit(torch.autograd.Function):
    """An entropic plan P_ij = exp(f_i + g_j + logits_ij) whose backward is
    implicit differentiation: the potentials move so that P keeps its row
    and column sums. For an upstream gradient H, with r = (H*P) 1 and
    c = (H*P)^T 1, solve [[diag(P 1), P], [P^T, diag(P^T 1)]] [x; y] = [r; c]
    (singular along [1; -1], which leaves x_i + y_j unchanged: a rank-one
    term fixes it) by its (E, E) Schur complement; the gradient is
    P * (H - x_i - y_j)."""

    @staticmethod
    def forward(ctx, logits: Tensor, iterations: int, alpha: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        plan = _sinkhorn(logits, iterations) if alpha is None else _semi_dual_entropic_plan(alpha, logits)
        ctx.save_for_backward(plan)
        return plan

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], None, None]:  # type: ignore[override]
        (plan,) = ctx.saved_tensors
        hp = grad * plan
        r, c = hp.sum(2), hp.sum(1)                                    # (G, S), (G, E)
        row, col = plan.sum(2), plan.sum(1)
        scaled = plan / row.unsqueeze(-1)                              # diag(1/row) P
        schur = torch.diag_embed(col) - plan.transpose(1, 2) @ scaled  # (G, E, E), null vector 1
        schur = schur + schur.new_ones(schur.shape[-1], schur.shape[-1]) / schur.shape[-1]
        rhs = c - (scaled.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
        y = torch.linalg.solve(schur, rhs)
        x = (r - (plan @ y.unsqueeze(-1)).squeeze(-1)) / row
        return plan * (grad - x.unsqueeze(-1) - y.unsqueeze(1)), None, None


def _check_gradient(gradient: str, allowed: tuple[str, ...]) -> None:
    if gradient not in allowed:
        raise ValueError(f"gradient={gradient!r} is not available here: use one of {list(allowed)}.")
