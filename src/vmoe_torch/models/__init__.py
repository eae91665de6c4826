"""Models: the V-MoE backbone, size table and named presets."""
from .config import ModelConfig, MoeConfig
from .registry import create_model, list_models, resolve_config
from .variants import every_n, last_n, parse_description
from .vit_moe import VisionTransformerMoe

__all__ = ["ModelConfig", "MoeConfig", "create_model", "list_models", "resolve_config",
           "every_n", "last_n", "parse_description", "VisionTransformerMoe"]
