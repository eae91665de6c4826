"""`create_model`: a model from a catalogue name or a paper description."""
from __future__ import annotations

from typing import Any

from ..config.catalogue import resolve_config
from .vit_moe import VisionTransformerMoe


def create_model(name: str, **overrides: Any) -> VisionTransformerMoe:
    """Builds a model from a preset name (see `list_models()`) or a paper
    description, e.g. `create_model("ViT-S/32, E=8, K=2, Last 2", num_classes=10)`;
    overrides follow `vmoe_torch.config.catalogue.resolve_config`."""
    return VisionTransformerMoe(resolve_config(name, **overrides))
