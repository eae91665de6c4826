"""`MoeMlp`: router -> dispatch -> experts -> combine (reference MlpMoeBlock).

Axis legend: see `vmoe_torch.moe.routing`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config.routing import RoutingConfig, check_group_size
from .dispatch import DroplessDispatcher
from .experts import Experts
from .groups import merge_runs, split_into_groups
from .noise import GroupNoise
from .router_factory import build_router, reroute
from .routers import DISPATCH_IMPLS, Router, SoftRouter, _GatingRouter

Metrics = dict[str, Tensor]


class MoeMlp(nn.Module):
    """Mixture of E expert MLPs behind a router (top-K, expert choice or Soft).

    `forward(x)` takes (B, N, D) and returns `(y, metrics)`: y (B, N, D) is
    the MoE output WITHOUT the residual (like the reference's MlpMoeBlock);
    `metrics["auxiliary_loss"]` is a 0-dim tensor, the weighted auxiliary loss
    averaged over groups. The other metrics are documented in docs/usage.md.

    Args:
      dim: D. mlp_dim: hidden size H of each expert. num_experts: E.
      routing: the layer's `RoutingConfig` (default: `RoutingConfig()`).
      group_size: tokens per routing group (None: the whole batch is one group).
      dropout_rate: dropout inside the experts.
      gelu: "tanh" (flax's approximation) or "erf" inside the experts.
      ensemble_size: M > 1 makes this an E^3 layer: its input is (B*M, N, D),
        row b*M + m being image b for member m; inside, tokens are laid out
        (B, N, M) so that members alternate fastest in every group (the
        reference's layout), and member m routes only among its E/M experts.
      **routing_changes: any `RoutingConfig` field, applied on top of
        `routing` (num_selected_experts, capacity_factor, batch_priority, ...).
    """

    returns_metrics = True  # `layers.block.Block`: forward(x, noise=) -> (y, metrics)

    def __init__(self, dim: int, mlp_dim: int, num_experts: int,
                 routing: Optional[RoutingConfig] = None, *, group_size: Optional[int] = None,
                 dropout_rate: float = 0.0, ensemble_size: int = 1, gelu: str = "tanh",
                 **routing_changes: Any) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
        check_group_size(group_size, ensemble_size)
        config = (routing or RoutingConfig()).updated(**routing_changes)
        self.dim, self.num_experts, self.group_size = dim, num_experts, group_size
        self.ensemble_size = ensemble_size
        self.router: Router = build_router(dim, num_experts, config, group_size, ensemble_size,
                                           init=False)
        self.experts = Experts(num_experts, dim, mlp_dim, dropout_rate, gelu)
        self.router.reset_parameters()
        self.generator: Optional[torch.Generator] = None  # unseeded noise: this generator, else torch's
        self.noise = GroupNoise()  # seeded per-group noise (`moe.noise`)

    # ------------------------------------------------------------ noise
    @property
    def noise_seed(self) -> Optional[int]:
        """Seed of the per-group router noise in training (None: torch's RNG)."""
        return self.noise.seed

    @noise_seed.setter
    def noise_seed(self, seed: Optional[int]) -> None:
        self.noise.seed = seed

    # ------------------------------------------------------------ routing
    @property
    def routing(self) -> RoutingConfig:
        """The settings the router runs with (the only copy)."""
        return self.router.config

    @routing.setter
    def routing(self, config: RoutingConfig) -> None:
        self.apply_routing(config)

    def set_routing(self, **changes: Any) -> None:
        """Changes routing settings in place (K, capacity, BPR, router, ...)."""
        self.apply_routing(self.routing.updated(**changes))

    def set_group_size(self, group_size: Optional[int]) -> None:
        """Routes groups of `group_size` tokens from now on (None: each batch
        is one group). Soft MoE's slot count is fixed by its parameters, so
        it accepts only a group size that keeps it."""
        check_group_size(group_size, self.ensemble_size)
        current = self.router
        if isinstance(current, SoftRouter):
            slots = SoftRouter.slots_for(self.routing, group_size, self.num_experts)
            if slots != current.num_slots:
                raise ValueError(
                    f"Soft MoE's slot count is fixed by its parameters mu (D, E, p={current.num_slots}); "
                    f"group_size={group_size} with these settings gives p={slots}. Set num_slots={current.num_slots} "
                    "to change the group size.")
        self.group_size = group_size

    def apply_routing(self, config: RoutingConfig) -> None:
        """Runs the layer with `config` from now on (`routers.reroute`)."""
        self.router = reroute(self.router, config, self.group_size, self.ensemble_size)

    @property
    def dispatch_impl(self) -> str:
        """"index" (gather/gather, the fast path) or "einsum" (the reference's
        dense (G, S, E, C) dispatch, kept for comparison and debugging)."""
        return getattr(self.router, "dispatch_impl", "einsum")

    @dispatch_impl.setter
    def dispatch_impl(self, name: str) -> None:
        if name not in DISPATCH_IMPLS:
            raise ValueError(f"Unknown dispatch_impl {name!r}; valid: {list(DISPATCH_IMPLS)}.")
        if isinstance(self.router, _GatingRouter):
            self.router.dispatch_impl = name

    def capacity_for(self, group_size: int) -> int:
        """C for a group of `group_size` tokens (Soft MoE: its p slots)."""
        return self.router.capacity(group_size)

    def router_logits(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (G, S, E) float32 logits of a sparse router."""
        if not isinstance(self.router, _GatingRouter):
            raise ValueError("router_logits is defined for the sparse routers; Soft MoE's "
                             "logits are (G, S, E, p): see vmoe_torch.moe.soft.")
        return self.router.logits(x)

    # ------------------------------------------------------------ forward
    def forward(self, x: Tensor, noise: Optional[Tensor] = None) -> tuple[Tensor, Metrics]:
        """(B, N, D) -> ((B, N, D), metrics). See `route_tokens`."""
        return moe_forward(self, x, noise)

    def route_tokens(self, x: Tensor, noise: Optional[Tensor] = None) -> tuple[Tensor, Metrics]:
        """(B, N, D) -> ((B, N, D), metrics).

        Args:
          noise: optional standard-normal draw for the router in training
            mode, one row block per routing group (see `split_into_groups`):
            (G_total, S, E) for top-K and expert choice, (G_total, S, E/M)
            for an E^3 router, (G_total, S, E, p) for Soft MoE; a smaller
            last group reads the first rows of its block. Without it the
            draw comes from `self.generator` or torch's global RNG.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoeMlp expects (B, N, {self.dim}), got {tuple(x.shape)}.")
        batch, seq, dim = x.shape
        m = self.ensemble_size
        if batch % m:
            raise ValueError(f"An E^3 layer with ensemble_size={m} needs B*M rows, got {batch}.")
        if m > 1:  # (B*M, N, D) -> (B, N, M, D): members alternate fastest
            x = x.view(batch // m, m, seq, dim).transpose(1, 2)
        tokens = x.reshape(batch * seq, dim)
        outs: list[Tensor] = []
        per_run: list[Metrics] = []
        runs = split_into_groups(batch * seq, self.group_size)
        g_seen = self.noise.shard * sum(groups for _, groups, _ in runs)
        for start, groups, size in runs:
            xg = tokens[start:start + groups * size].view(groups, size, dim)
            run_noise = None
            if noise is not None:
                run_noise = noise[g_seen:g_seen + groups, :size]
            elif self.training and self.noise.seeded:
                run_noise = self.group_noise(g_seen, groups, size)
            y, metrics = self._route(xg, run_noise)
            outs.append(y.reshape(groups * size, dim))
            per_run.append(metrics)
            g_seen += groups
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        if m > 1:
            y = y.view(batch // m, seq, m, dim).transpose(1, 2)
        return y.reshape(batch, seq, dim), merge_runs(per_run)

    def group_noise(self, first_group: int, groups: int, size: int) -> Tensor:
        """(groups, *noise shape of a group of `size`) standard normals for
        global groups first_group.. (`moe.noise.group_normal`)."""
        shape = self.router.noise_shape(1, size)[1:]
        return self.noise.draw(first_group, groups, tuple(shape))

    def _route(self, x: Tensor, noise: Optional[Tensor]) -> tuple[Tensor, Metrics]:
        """(G, S, D) -> ((G, S, D), metrics): router -> experts -> combine."""
        if self.routing.ablate:
            return torch.zeros_like(x), {"auxiliary_loss_per_group": x.new_zeros(x.shape[0])}
        dispatcher, metrics = self.router(x, noise, self.generator)
        inner = getattr(dispatcher, "inner", dispatcher)
        if isinstance(inner, DroplessDispatcher):
            if not hasattr(self.experts, "forward_grouped"):
                raise ValueError(f"dropless routing needs experts with forward_grouped; "
                                 f"{type(self.experts).__name__} has none: route with a capacity "
                                 "(set_routing(dropless=False)).")
            rows = dispatcher.dispatch(x)
            y = dispatcher.combine(self.experts.forward_grouped(rows, inner.offsets, inner.row_expert))
        else:
            y = dispatcher.combine(self.experts(dispatcher.dispatch(x)))
        return y.to(x.dtype), metrics



def moe_forward(layer: MoeMlp, x: Tensor, noise: Optional[Tensor] = None) -> tuple[Tensor, Metrics]:
    """`layer.route_tokens(x, noise)`. FX symbolic tracing records this call
    as one node (`torch.fx.wrap`) instead of tracing into routing, whose
    group split and capacities depend on the token count: a traced model
    (torchvision's `create_feature_extractor`, timm's FX features) runs the
    real MoE layer, input checks included."""
    return layer.route_tokens(x, noise)


torch.fx.wrap("moe_forward")
