"""Sparse mixture-of-experts: capacity, routing, dispatch, experts, layer.

Axis legend (every function here): G groups, S group size, E experts,
C capacity, K selected experts per token, D hidden size.
"""
from .capacity import compute_capacity
from .config import RoutingConfig
from .dispatch import (EinsumDispatcher, ExpertChoiceDispatcher, IndexDispatcher,
                       dense_combine_weights, routing_to_dense, top_items_to_dense)
from .experts import Experts
from .layer import MoeMlp, split_into_groups
from .routing import (TopExpertsRouting, TopItemsRouting, gshard_loss, importance_loss,
                      load_loss, top_experts_per_item, top_items_metrics,
                      top_items_per_expert)

__all__ = [
    "compute_capacity", "RoutingConfig", "EinsumDispatcher", "ExpertChoiceDispatcher",
    "IndexDispatcher", "dense_combine_weights", "routing_to_dense", "top_items_to_dense",
    "Experts", "MoeMlp", "split_into_groups", "TopExpertsRouting", "TopItemsRouting",
    "gshard_loss", "importance_loss", "load_loss", "top_experts_per_item",
    "top_items_metrics", "top_items_per_expert",
]
