"""Mixture-of-experts: capacity, routing, routers, dispatch, experts, layer.

Axis legend (every function here): G groups, S group size, E experts,
C capacity, K selected experts per token, D hidden size, p Soft MoE slots
per expert, M ensemble members.
"""
from ..config.routing import ROUTERS, RoutingConfig
from .capacity import compute_capacity
from .dispatch import (
                       Bfloat16Dispatcher,
                       Dispatcher,
                       EinsumDispatcher,
                       ExpertChoiceDispatcher,
                       IndexDispatcher,
                       SoftDispatcher,
                       dense_combine_weights,
                       routing_to_dense,
                       top_items_to_dense,
)
from .experts import Experts
from .groups import split_into_groups
from .layer import MoeMlp
from .ot_routers import OTExpertsChooseRouter, OTTokensChooseRouter
from .router_factory import build_router
from .routers import ExpertChoiceRouter, Router, SoftRouter, TopExpertsRouter
from .routing import (
                       TopExpertsRouting,
                       TopItemsRouting,
                       gshard_loss,
                       importance_loss,
                       load_loss,
                       top_experts_per_item,
                       top_items_metrics,
                       top_items_per_expert,
)
from .soft import soft_num_slots, soft_router_logits, soft_weights

__all__ = [
    "compute_capacity", "ROUTERS", "RoutingConfig", "Bfloat16Dispatcher", "Dispatcher",
    "EinsumDispatcher", "ExpertChoiceDispatcher", "IndexDispatcher", "SoftDispatcher",
    "dense_combine_weights", "routing_to_dense", "top_items_to_dense", "Experts", "MoeMlp",
    "split_into_groups", "ExpertChoiceRouter", "Router", "SoftRouter", "TopExpertsRouter",
    "build_router", "OTExpertsChooseRouter", "OTTokensChooseRouter",
    "TopExpertsRouting", "TopItemsRouting", "gshard_loss", "importance_loss",
    "load_loss", "top_experts_per_item", "top_items_metrics", "top_items_per_expert",
    "soft_num_slots", "soft_router_logits", "soft_weights",
]
