"""Which router runs: `build_router` makes the one a `RoutingConfig` names,
and `reroute` switches a layer's router at inference (the sparse routers,
the optimal-transport ones included, share their gating matrix)."""
from __future__ import annotations

from typing import Optional

from ..config.routing import RoutingConfig
from .ot_routers import OTExpertsChooseRouter, OTTokensChooseRouter
from .routers import ExpertChoiceRouter, Router, SoftRouter, TopExpertsRouter, _GatingRouter


def build_router(dim: int, num_experts: int, config: RoutingConfig, group_size: Optional[int],
                 ensemble_size: int = 1, init: bool = True) -> Router:
    """The router named by `config.router`; `init=False` leaves the
    parameters to a later `reset_parameters()` (MoeMlp initialises its
    experts first, in the order earlier versions drew from the RNG)."""
    config.validate(num_experts)
    router = _new_router(dim, num_experts, config, group_size, ensemble_size)
    if init:
        router.reset_parameters()
    return router


def _new_router(dim: int, num_experts: int, config: RoutingConfig, group_size: Optional[int],
                ensemble_size: int) -> Router:
    if ensemble_size > 1 and config.router != "top_experts":
        raise ValueError(f"E^3 ensembles (ensemble_size={ensemble_size}) route with top_experts; "
                         f"router {config.router!r} has no ensemble form.")
    if config.router == "top_experts":
        return TopExpertsRouter(dim, num_experts, config, ensemble_size)
    if config.router == "expert_choice":
        return ExpertChoiceRouter(dim, num_experts, config)
    if config.router in ("ot_ksparse_tc", "ot_kl_tc"):
        return OTTokensChooseRouter(dim, num_experts, config)
    if config.is_ot:
        return OTExpertsChooseRouter(dim, num_experts, config)
    return SoftRouter(dim, num_experts, config, group_size)


def reroute(current: Router, config: RoutingConfig, group_size: Optional[int], ensemble_size: int = 1) -> Router:
    """The router that runs `config` from now on: `current` itself with the
    new settings, or, for a switch between top-K and expert choice (which
    share the gating matrix), a new router holding `current`'s parameters.
    Soft MoE's parameters (and its slot count) are fixed by training."""
    num_experts = current.num_experts
    config.validate(num_experts)
    if config.router == current.kind:
        if isinstance(current, SoftRouter):
            slots = SoftRouter.slots_for(config, group_size, num_experts)
            if slots != current.num_slots:
                raise ValueError(
                    f"Soft MoE's slot count is fixed by its parameters mu (D, E, p={current.num_slots}); "
                    f"these settings give p={slots}. Keep num_slots / capacity_factor.")
        if isinstance(current, TopExpertsRouter):
            current.check_k(config)
        current.config = config
        return current
    if isinstance(current, _GatingRouter) and config.router != "soft":
        new = build_router(current.weight.shape[1], num_experts, config, group_size, ensemble_size, init=False)
        assert isinstance(new, _GatingRouter)
        new.take_parameters(current)
        new.train(current.training)
        return new
    raise ValueError(f"Cannot switch router {current.kind!r} -> {config.router!r}: their "
                     "parameters differ (Soft MoE has slot parameters, the sparse routers a "
                     "gating matrix). Build a new model, or upcycle.")
