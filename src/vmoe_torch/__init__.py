"""vmoe-torch: V-MoE (Riquelme et al. 2021, arXiv 2106.05974) in PyTorch."""
from typing import Any, Optional

import wrapt

from .models import ModelConfig, MoeConfig, VisionTransformerMoe, create_model, list_models
from .models.aux_loss import WithAuxiliaryLoss
from .moe import MoeMlp, RoutingConfig

__version__ = "0.1.0"


def _register_with_timm() -> None:
    """Our architectures join timm's registry (`timm.create_model(
    "vmoe_s32_last2_e8_k2", ...)`) when timm is imported, before or after
    vmoe_torch: a post-import hook, so that `import vmoe_torch` does not
    import timm (about a second) for users who do not use it."""
    wrapt.register_post_import_hook("vmoe_torch.integrations.timm:register_on_import", "timm")


_register_with_timm()

__all__ = ["ModelConfig", "MoeConfig", "VisionTransformerMoe", "create_model", "list_models",
           "MoeMlp", "RoutingConfig", "WithAuxiliaryLoss", "from_pretrained", "save_pretrained", "upcycle"]


def from_pretrained(path: str, **kwargs: Any) -> VisionTransformerMoe:
    """Loads a model exported with `vmoe convert` or `save_pretrained`
    (model.safetensors + config.json)."""
    return VisionTransformerMoe.from_pretrained(path, **kwargs)


def save_pretrained(model: VisionTransformerMoe, out_dir: str, overwrite: bool = False,
                    source: Optional[dict[str, Any]] = None) -> None:
    """`model.save_pretrained(out_dir)`: model.safetensors + config.json + README.md."""
    model.save_pretrained(out_dir, overwrite=overwrite, source=source)


def upcycle(source, model, **options):
    """Sparse upcycling of a dense ViT (timm, torchvision, Hugging Face,
    vit_jax, vmoe native or ours) into a V-MoE; see
    `vmoe_torch.upcycling.upcycle` for the arguments."""
    from .upcycling import upcycle as _upcycle
    return _upcycle(source, model, **options)
