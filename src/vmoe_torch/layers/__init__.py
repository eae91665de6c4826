"""Plain ViT layers; nothing here knows about mixtures of experts."""
from .attention import Attention, CrossAttention
from .block import Block
from .heads import MapHead
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .posemb import resample_pos_embed, sincos2d_pos_embed

__all__ = ["Attention", "Block", "CrossAttention", "MapHead", "Mlp", "PatchEmbed",
           "resample_pos_embed", "sincos2d_pos_embed"]
