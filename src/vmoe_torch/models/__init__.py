"""Models: the V-MoE backbone, size table and named presets."""
from .config import LayerRouting, ModelConfig, MoeConfig
from .ensemble import ensemble_log_probs, extract_member
from .registry import create_model, list_models, resolve_config
from .variants import every_n, last_n, parse_description
from .vit_moe import VisionTransformerMoe

__all__ = ["LayerRouting", "ModelConfig", "MoeConfig", "ensemble_log_probs", "extract_member",
           "create_model", "list_models", "resolve_config", "every_n", "last_n",
           "parse_description", "VisionTransformerMoe"]
