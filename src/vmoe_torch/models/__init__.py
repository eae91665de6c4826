"""Models: the V-MoE backbone, its construction from the catalogue, and
loading from work dirs, checkpoints and `from_pretrained` directories."""
from ..config.catalogue import list_models, resolve_config
from ..config.descriptions import every_n, last_n, parse_description
from ..config.model import LayerRouting, ModelConfig, MoeConfig
from .ensemble import ensemble_log_probs, extract_member
from .factory import create_model
from .loading import consolidate, load_model
from .vit_moe import VisionTransformerMoe

__all__ = ["LayerRouting", "ModelConfig", "MoeConfig", "ensemble_log_probs", "extract_member",
           "create_model", "list_models", "resolve_config", "every_n", "last_n",
           "parse_description", "VisionTransformerMoe", "consolidate", "load_model"]
