"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): a dense ViT's
weights become a V-MoE whose experts all start as the dense MLP of their
block, with a freshly initialised router; everything else is copied.

    model = vmoe_torch.upcycle(timm.create_model("deit_small_patch16_224"),
                               "E=8, K=2, Every 2", noise_std=0.01, num_classes=10)

The backbone (width, depth, heads, patch, GELU, eps, pooling, normalisation)
is read from the source; the description gives only the MoE part.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import torch

from ..config.descriptions import parse_description, parse_moe_description
from ..config.model import ModelConfig, MoeConfig
from ..models.vit_moe import VisionTransformerMoe
from .files import SourceError
from .sources import Source, load_into, read_dense


def _target_moe(dense: ModelConfig, model: Union[str, MoeConfig, ModelConfig]) -> MoeConfig:
    if isinstance(model, ModelConfig):
        if model.moe is None:
            raise SourceError("The target config has no MoE layers.")
        _check_backbone(dense, model)
        return model.moe
    if isinstance(model, MoeConfig):
        return model
    if "/" not in model:
        try:
            moe = parse_moe_description(model, dense.num_layers, dense.tokens_per_image)
        except ValueError as e:
            raise SourceError(str(e)) from e
        moe.validate(dense.num_layers)
        return moe
    # A full paper description: its backbone must be the source's.
    parsed = parse_description(model, num_classes=max(dense.num_classes, 1), image_size=dense.image_size[0])
    if parsed.moe is None:
        raise SourceError(f"{model!r} has no experts (E=...).")
    _check_backbone(dense, parsed)
    members = parsed.moe.ensemble_size
    # 8 images per routing group (the paper's) at the source's token count.
    return dataclasses.replace(parsed.moe, group_size=8 * dense.tokens_per_image * members)


def _check_backbone(dense: ModelConfig, target: ModelConfig) -> None:
    fields = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size")
    bad = [f"{f}: source {getattr(dense, f)} vs target {getattr(target, f)}" for f in fields
           if getattr(dense, f) != getattr(target, f)]
    if bad:
        raise SourceError(
            "The described backbone is not the source's (mismatched width/depth): "
            f"{bad}. The source's backbone is read from it ({dense.hidden_size} wide, {dense.num_layers} "
            f"blocks, {dense.num_heads} heads, patch {dense.patch_size[0]}): give only the MoE part, "
            "e.g. 'E=8, K=2, Every 2'.")


@torch.no_grad()
def upcycle(source: Source, model: Union[str, MoeConfig, ModelConfig], *, source_format: Optional[str] = None,
            noise_std: float = 0.0, seed: int = 0, num_classes: Optional[int] = None,
            group_size: Optional[int] = None, read_options: Optional[Mapping[str, Any]] = None,
            **routing: Any) -> VisionTransformerMoe:
    """A V-MoE upcycled from a dense ViT.

    Args:
      source: a weight file / directory / native prefix, a state_dict, a
        timm / torchvision / Hugging Face module (see `read_dense`), or a
        `DenseSource` that `read_dense` already returned.
      model: the MoE part ("E=8, K=2, Every 2", "E=8, K=1, M=2, Last 2" for
        E^3, "E=16, p=1" for Soft MoE, "... Layers 1 3"; the backbone is the
        source's), a full description whose backbone must be the source's
        ("ViT-B/16, E=8, K=2, Every 2"), or a MoeConfig / ModelConfig.
      noise_std: each expert's weights get N(0, (noise_std * rms(W))^2) noise
        (seeded by `seed`, independent per expert) to break their symmetry;
        0 keeps exact copies.
      num_classes: a new, zero-initialised head with this many classes (the
        source's head is kept when None or equal).
      group_size: tokens per routing group (default 8 images).
      read_options: `read_dense` options (mean=/std=/normalization=,
        num_heads=, image_size=, ...).
      **routing: RoutingConfig changes, e.g. router="expert_choice",
        capacity_factor=2.0, num_selected_experts=1, batch_priority=True.
        Dispatch is float32 unless bfloat16_dispatch=True: the upcycled model
        then computes the dense model exactly (to float32 rounding) when every
        token reaches every expert (K = E, nothing dropped).
    """
    src = read_dense(source, source_format, **dict(read_options or {}))  # a DenseSource is returned as is
    if src.config.moe is not None:
        raise SourceError("The source is already a V-MoE.")
    moe = _target_moe(src.config, model)
    routing = {"bfloat16_dispatch": False, **routing}
    moe = dataclasses.replace(moe, routing=moe.routing.updated(**routing),
                              group_size=group_size if group_size is not None else moe.group_size)
    if moe.mlp_dim not in (None, src.config.mlp_dim):
        raise SourceError(f"Experts are copies of the dense MLP: moe.mlp_dim must be "
                          f"{src.config.mlp_dim}, got {moe.mlp_dim}.")
    # head_kernel_zero_init: a new head (num_classes) starts at zero, as in fine-tuning.
    cfg = dataclasses.replace(src.config, moe=dataclasses.replace(moe, mlp_dim=None),
                              head_kernel_zero_init=True)
    torch.manual_seed(seed)  # the router's fresh initialisation
    out = VisionTransformerMoe(cfg)
    load_into(out, upcycled_state(src.state, cfg, out.state_dict(), noise_std, seed))
    if num_classes is not None and num_classes != cfg.num_classes:
        out.reset_classifier(num_classes)
    return out.eval()


def upcycled_state(dense: Mapping[str, torch.Tensor], cfg: ModelConfig, fresh: Mapping[str, torch.Tensor],
                   noise_std: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """The V-MoE state_dict: dense weights copied, each MoE block's dense MLP
    copied into its E experts (kernels transposed to the (E, in, out) layout),
    routers as in `fresh` (newly initialised)."""
    assert cfg.moe is not None
    experts = cfg.moe.num_experts
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    moe_layers = set(cfg.moe.layers)
    for name, value in dense.items():
        parts = name.split(".")
        if parts[0] == "blocks" and int(parts[1]) in moe_layers and parts[2] == "mlp":
            continue
        out[name] = value
    for i in moe_layers:
        p = f"blocks.{i}.mlp"
        pairs = {"w1": dense[f"{p}.fc1.weight"].T, "b1": dense[f"{p}.fc1.bias"],
                 "w2": dense[f"{p}.fc2.weight"].T, "b2": dense[f"{p}.fc2.bias"]}
        for key, value in pairs.items():
            stacked = value.unsqueeze(0).repeat(experts, *([1] * value.dim())).contiguous()
            if noise_std > 0:
                rms = value.pow(2).mean().sqrt()
                stacked = stacked + noise_std * rms * torch.randn(stacked.shape, generator=gen)
            out[f"{p}.experts.{key}"] = stacked
        for key, value in fresh.items():
            if key.startswith(f"{p}.router."):
                out[key] = value
    return out
