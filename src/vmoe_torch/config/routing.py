"""Typed routing settings of one MoE layer: the one object that travels
unchanged from a config file to the router that uses it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

RouterName = Literal["top_experts", "expert_choice", "soft", "ot_sparse_ec", "ot_ksparse_tc", "ot_ksparse_ec",
                     "ot_kl_tc", "ot_kl_ec"]
# The sparsity-constrained optimal-transport routers (tc: tokens choose K
# experts on the plan; ec: experts choose C tokens on the plan).
OT_ROUTERS: tuple[str, ...] = ("ot_sparse_ec", "ot_ksparse_tc", "ot_ksparse_ec", "ot_kl_tc", "ot_kl_ec")
ROUTERS: tuple[str, ...] = ("top_experts", "expert_choice", "soft") + OT_ROUTERS
OT_GRADIENTS: tuple[str, ...] = ("none", "unrolled", "implicit")


@dataclass(frozen=True)
class RoutingConfig:
    """How one MoE layer routes its tokens.

    Attributes:
      router: "top_experts" (reference NoisyTopExpertsPerItemRouter, the
        paper's), "expert_choice" (NoisyTopItemsPerExpertRouter), "soft"
        (Soft MoE, the reference's `soft_moe.router.SoftRouter`), or one of
        the sparsity-constrained optimal-transport routers of the reference's
        `projects/sparsity_constrained_ot` (`vmoe_torch.moe.ot_routers`):
        "ot_sparse_ec" (SparseProjectionTransportTopItemsPerExpertRouter),
        "ot_ksparse_tc" / "ot_ksparse_ec" (KSparseProjectionTransport
        TopExpertsPerItem / TopItemsPerExpert), "ot_kl_tc" / "ot_kl_ec"
        (KLProjectionNoisy TopExpertsPerItem / TopItemsPerExpert).
      num_selected_experts: K, experts per token (top_experts only).
      capacity_factor: sparse routers: C = capacity_factor * S * K / E
        (rounded, see `compute_capacity`); exactly one of this and `capacity`
        is set. Soft: p = round(S * capacity_factor / E) slots per expert
        unless `num_slots` is given.
      capacity: explicit per-group buffer size C, used as is (sparse only).
      num_slots: Soft MoE's explicit slots per expert p (then
        `capacity_factor` is ignored, as in the reference).
      capacity_ceil_or_round, capacity_multiple_of: rounding of C (sparse
        only; Soft MoE always uses round() and no multiple, as the reference).
      batch_priority: Batch Priority Routing (sparse top-K only).
      priority: BPR score: "max" (top gate, the paper's), "sum" of the top-K
        gates, or "random".
      noise_std: router noise in training mode. Top-K / expert choice add
        N(0, (noise_std / E)^2) to the logits; Soft MoE adds N(0, noise_std^2).
        None: the router's reference default (1.0 sparse, 0.0 soft).
      importance_loss_weight, load_loss_weight, gshard_loss_weight: weights
        of the top-K auxiliary losses; a loss with weight 0 is reported, not
        added. Soft MoE and expert choice have no auxiliary loss.
      bfloat16_dispatch: round tokens entering and outputs leaving the
        experts to bfloat16 (the reference's `Bfloat16Dispatcher`). None: the
        router's reference default (off for sparse routers, always on in
        the reference's Soft MoE).
      ablate: return a zero MoE output (the residual alone), for analysis.
      dropless: top-K routing without capacity: every choice is kept and the
        experts run on exactly their tokens (sorted by expert, grouped
        matmuls; `vmoe_torch.moe.dispatch.DroplessDispatcher`). The
        capacity settings are then unused; a model trained with capacity
        can be run dropless at inference, and trained dropless.
      ot_maxiter: the OT routers' solver iterations: Adam steps (L2 routers),
        Sinkhorn iterations (run in blocks of 10 as ott-jax does:
        floor(ot_maxiter / 10) * 10), or L-BFGS iterations.
      ot_adam_lr: Adam's learning rate of the L2 routers' solver.
      ot_lbfgs: "ot_kl_tc" solves with L-BFGS instead of Sinkhorn.
      ot_softmax_combine: combine with the softmax of the router logits
        (the reference's `use_softmax_combine_weights`, default) instead of
        the plan's values.
      local_entropy_loss_weight, global_entropy_loss_weight: LIMoE's
        entropy losses (Mustafa et al. 2022, top_experts only; written to
        files only when set): the mean entropy of each token's gates
        (pushes every token to a confident choice), and minus the entropy of
        the group's mean gates (pushes the group to use many experts). With
        one modality per forward, as the multimodal model runs them, they
        are the paper's per-modality losses.
      ot_gradient: how gradients pass through the plan: "none", "unrolled"
        or "implicit" (entropic routers only). None: the reference's
        ("none" for the L2 routers, whose plans jaxopt computes from
        stop-gradient projections; "implicit" for the KL routers).
    """

    router: RouterName = "top_experts"
    num_selected_experts: int = 1
    capacity_factor: Optional[float] = 1.05
    capacity: Optional[int] = None
    num_slots: Optional[int] = None
    capacity_ceil_or_round: Literal["ceil", "round"] = "ceil"
    capacity_multiple_of: Optional[int] = 4
    batch_priority: bool = False
    priority: Literal["max", "sum", "random"] = "max"
    noise_std: Optional[float] = None
    importance_loss_weight: float = 1.0
    load_loss_weight: float = 1.0
    gshard_loss_weight: float = 0.0
    bfloat16_dispatch: Optional[bool] = None
    ablate: bool = False
    dropless: bool = False
    ot_maxiter: int = 20
    ot_adam_lr: float = 0.01
    ot_lbfgs: bool = False
    ot_softmax_combine: bool = True
    ot_gradient: Optional[str] = None
    local_entropy_loss_weight: float = 0.0
    global_entropy_loss_weight: float = 0.0

    # Written to files only when set (`config.typed.to_dict`).
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("ot_maxiter", "ot_adam_lr", "ot_lbfgs", "ot_softmax_combine",
                                                  "ot_gradient", "local_entropy_loss_weight",
                                                  "global_entropy_loss_weight")

    # ------------------------------------------------------------- derived
    @property
    def is_soft(self) -> bool:
        return self.router == "soft"

    @property
    def is_ot(self) -> bool:
        return self.router in OT_ROUTERS

    @property
    def is_entropic(self) -> bool:
        """An entropic (KL) OT router: noisy, with implicit gradients."""
        return self.router in ("ot_kl_tc", "ot_kl_ec")

    @property
    def effective_noise_std(self) -> float:
        if self.is_ot and not self.is_entropic:
            return 0.0  # the L2 OT routers take no noise (validated)
        if self.noise_std is not None:
            return self.noise_std
        return 0.0 if self.is_soft else 1.0

    @property
    def effective_ot_gradient(self) -> str:
        if self.ot_gradient is not None:
            return self.ot_gradient
        return "implicit" if self.is_entropic else "none"

    @property
    def effective_bfloat16(self) -> bool:
        if self.bfloat16_dispatch is not None:
            return self.bfloat16_dispatch
        return self.is_soft

    # ------------------------------------------------------------- changes
    def updated(self, **changes: Any) -> "RoutingConfig":
        """A copy with `changes` applied, validated field by field.

        The one place of the capacity rule: setting `capacity` clears
        `capacity_factor` and vice versa (unless both are given, which is
        then rejected by `validate`); setting `num_slots` is kept beside
        `capacity_factor` (Soft MoE ignores the factor then).
        """
        if not changes:
            return self
        fields = {f.name for f in dataclasses.fields(RoutingConfig)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ValueError(f"Unknown routing setting(s) {unknown}; valid: {sorted(fields)}.")
        changes = dict(changes)
        if changes.get("capacity") is not None and "capacity_factor" not in changes:
            changes["capacity_factor"] = None
        if changes.get("capacity_factor") is not None and "capacity" not in changes:
            changes["capacity"] = None
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------- validation
    def validate(self, num_experts: int) -> None:
        """Raises ValueError naming the problem and the fix."""
        if self.router not in ROUTERS:
            raise ValueError(f"Unknown router {self.router!r}: use one of {list(ROUTERS)}.")
        _check_type("num_selected_experts", self.num_selected_experts, int)
        for name in ("batch_priority", "ablate", "dropless"):
            _check_type(name, getattr(self, name), bool)
        if self.bfloat16_dispatch is not None:
            _check_type("bfloat16_dispatch", self.bfloat16_dispatch, bool)
        if self.capacity_factor is not None:
            _check_type("capacity_factor", self.capacity_factor, float)
            if not (math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
                raise ValueError(
                    f"capacity_factor must be a finite number > 0, got {self.capacity_factor}. "
                    "For no dropping at all use a large factor (e.g. E / K) or Soft MoE.")
        if self.capacity_ceil_or_round not in ("ceil", "round"):
            raise ValueError(
                f"capacity_ceil_or_round must be 'ceil' or 'round', got {self.capacity_ceil_or_round!r}.")
        if self.priority not in ("max", "sum", "random"):
            raise ValueError(f"priority must be 'max', 'sum' or 'random', got {self.priority!r}.")
        if self.noise_std is not None:
            _check_type("noise_std", self.noise_std, float)
            if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
                raise ValueError(f"noise_std must be finite and >= 0, got {self.noise_std}.")
        if self.dropless and self.router != "top_experts":
            raise ValueError(f"dropless applies to the top_experts router; {self.router!r} has no "
                             "dropped tokens to avoid (soft) or chooses tokens per expert (expert_choice).")
        self._validate_ot()
        for name in ("local_entropy_loss_weight", "global_entropy_loss_weight"):
            _check_type(name, getattr(self, name), float)
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}.")
            if getattr(self, name) and self.router != "top_experts":
                raise ValueError(f"{name} applies to the top_experts router (LIMoE's entropy losses), "
                                 f"not {self.router!r}.")
        if self.is_soft:
            self._validate_soft()
        else:
            self._validate_sparse(num_experts)

    def _validate_ot(self) -> None:
        defaults = RoutingConfig()
        ot_fields = ("ot_maxiter", "ot_adam_lr", "ot_lbfgs", "ot_softmax_combine", "ot_gradient")
        if not self.is_ot:
            changed = [f for f in ot_fields if getattr(self, f) != getattr(defaults, f)]
            if changed:
                raise ValueError(f"{changed} are settings of the optimal-transport routers "
                                 f"({', '.join(OT_ROUTERS)}); router {self.router!r} does not use them.")
            return
        _check_type("ot_maxiter", self.ot_maxiter, int)
        if self.ot_maxiter < 1:
            raise ValueError(f"ot_maxiter must be >= 1, got {self.ot_maxiter}.")
        _check_type("ot_adam_lr", self.ot_adam_lr, float)
        if not (math.isfinite(self.ot_adam_lr) and self.ot_adam_lr > 0):
            raise ValueError(f"ot_adam_lr must be a finite number > 0, got {self.ot_adam_lr}.")
        for name in ("ot_lbfgs", "ot_softmax_combine"):
            _check_type(name, getattr(self, name), bool)
        if self.ot_lbfgs and self.router != "ot_kl_tc":
            raise ValueError(f"ot_lbfgs applies to router 'ot_kl_tc' only (the reference's use_lbfgs); "
                             f"{self.router!r} has one solver.")
        gradient = self.effective_ot_gradient
        if gradient not in OT_GRADIENTS:
            raise ValueError(f"ot_gradient must be one of {list(OT_GRADIENTS)} or None, got {gradient!r}.")
        if gradient == "implicit" and not self.is_entropic:
            raise ValueError(f"ot_gradient='implicit' applies to the entropic routers (ot_kl_tc, ot_kl_ec); "
                             f"for {self.router!r} use 'none' (the reference's) or 'unrolled'.")
        if gradient == "unrolled" and self.ot_lbfgs:
            raise ValueError("ot_gradient='unrolled' is not available with ot_lbfgs: use 'implicit' or 'none'.")
        if not self.is_entropic and self.noise_std:
            raise ValueError(f"Router {self.router!r} adds no noise (as the reference's L2 OT routers): "
                             "leave noise_std unset or 0.")

    def _validate_sparse(self, num_experts: int) -> None:
        k = self.num_selected_experts
        if not 1 <= k <= num_experts:
            raise ValueError(
                f"num_selected_experts (K) must be in [1, num_experts={num_experts}], got "
                f"K={k}. Choose K <= E.")
        if self.num_slots is not None:
            raise ValueError(f"num_slots is a Soft MoE setting; router {self.router!r} uses "
                             "capacity or capacity_factor.")
        if (self.capacity is None) == (self.capacity_factor is None):
            raise ValueError(
                "Set exactly one of capacity and capacity_factor, got "
                f"capacity={self.capacity!r}, capacity_factor={self.capacity_factor!r}.")
        if self.capacity is not None:
            _check_type("capacity", self.capacity, int)
            if self.capacity < 1:
                raise ValueError(f"capacity must be >= 1, got {self.capacity}.")

    def _validate_soft(self) -> None:
        if self.capacity is not None:
            raise ValueError("Soft MoE has slots, not a capacity: set num_slots (slots per "
                             "expert) or capacity_factor, not capacity.")
        if self.batch_priority:
            raise ValueError("Soft MoE drops no token, so Batch Priority Routing does not "
                             "apply: set batch_priority=False.")
        if self.num_slots is None and self.capacity_factor is None:
            raise ValueError("Soft MoE needs num_slots or capacity_factor to size its slots.")
        if self.num_slots is not None:
            _check_type("num_slots", self.num_slots, int)
            if self.num_slots < 1:
                raise ValueError(f"num_slots must be >= 1, got {self.num_slots}.")


def check_group_size(group_size: Optional[int], ensemble_size: int = 1) -> None:
    """The one check of a routing group size (tokens per group; None: the
    whole batch is one group). With an E^3 ensemble of M members, the
    members alternate inside every group, so M must divide it."""
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1 token (or None), got {group_size!r}.")
    if ensemble_size > 1 and group_size % ensemble_size:
        raise ValueError(f"group_size={group_size} must be a multiple of ensemble_size={ensemble_size} "
                         "(members alternate inside every group).")


def _check_type(name: str, value: Any, tp: type) -> None:
    ok = isinstance(value, tp) and not isinstance(value, bool) if tp is not bool else isinstance(value, bool)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"{name} must be {tp.__name__}, got {value!r} ({type(value).__name__}).")
