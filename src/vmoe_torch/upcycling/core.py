"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): a dense ViT's
weights become a V-MoE whose experts all start as the dense MLP of their
block, with a freshly initialised router; everything else is copied.

    model = vmoe_torch.upcycle("vit.safetensors", "ViT-B/16, E=8, K=2, Every 2",
                               source_format="timm", noise_std=0.01, num_classes=10)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..config.descriptions import parse_description
from ..config.model import ModelConfig, MoeConfig
from ..models.vit_moe import VisionTransformerMoe
from .files import SourceError, load_json, load_npz, load_weights
from .readers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DenseSource,
    fold_input_normalization,
    read_hf,
    read_timm,
    read_torchvision,
    read_vit_jax,
)

FORMATS = ("timm", "torchvision", "hf", "vit_jax", "native", "vmoe_torch")
Source = Union[str, nn.Module, Mapping[str, Any], DenseSource]


def detect_format(keys: list[str]) -> str:
    """The library a state_dict's key layout comes from."""
    if any(".mlp.experts." in k or ".mlp.router." in k or "/Moe/" in k for k in keys):
        raise SourceError("The source is already a V-MoE (it has experts and routers); upcycling "
                          "needs a dense ViT.")
    if any(k.startswith("patch_embed.proj") for k in keys) and any(k.startswith("blocks.") for k in keys):
        return "timm"
    if "conv_proj.weight" in keys:
        return "torchvision"
    if any("embeddings.patch_embeddings" in k for k in keys):
        return "hf"
    if "embedding/kernel" in keys or any(k.startswith(("Transformer/", "params/Transformer/")) for k in keys):
        return "vit_jax"
    raise SourceError("Unknown key layout: not a timm, torchvision, Hugging Face or vit_jax ViT "
                      f"(first keys: {sorted(keys)[:5]}). Pass source_format / --from.")


def _from_module(module: nn.Module, fmt: Optional[str], **kw: Any) -> DenseSource:
    state = module.state_dict()
    fmt = fmt or detect_format(list(state))
    if fmt == "timm":
        cfg = getattr(module, "pretrained_cfg", None) or {}
        heads = module.blocks[0].attn.num_heads  # type: ignore[index,union-attr]
        return read_timm(state, num_heads=kw.get("num_heads") or heads, image_size=kw.get("image_size"),
                         mean=kw.get("mean") or cfg.get("mean", (0.5,) * 3),
                         std=kw.get("std") or cfg.get("std", (0.5,) * 3), where="timm module")
    if fmt == "torchvision":
        heads = module.encoder.layers[0].self_attention.num_heads  # type: ignore[index,union-attr]
        return read_torchvision(state, num_heads=kw.get("num_heads") or heads,
                                image_size=kw.get("image_size"), mean=kw.get("mean") or IMAGENET_MEAN,
                                std=kw.get("std") or IMAGENET_STD, where="torchvision module")
    if fmt == "hf":
        hf_cfg = module.config.to_dict()  # type: ignore[union-attr,operator]
        pre = {"image_mean": kw["mean"], "image_std": kw["std"]} if kw.get("mean") else None
        return read_hf(state, hf_cfg, pre, where="huggingface module")
    raise SourceError(f"Cannot read a {fmt!r} source from an nn.Module; pass a file.")


def read_dense(source: Source, source_format: Optional[str] = None, *, num_heads: Optional[int] = None,
               image_size: Optional[int] = None, classifier: Optional[str] = None,
               mean: Optional[tuple[float, ...]] = None, std: Optional[tuple[float, ...]] = None,
               reference_config: Optional[Mapping[str, Any]] = None) -> DenseSource:
    """Reads a dense ViT from a file / directory / checkpoint prefix, a
    state_dict, or a live timm / torchvision / Hugging Face module, with its
    input normalisation folded in (see `readers`)."""
    if source_format is not None and source_format not in FORMATS:
        raise SourceError(f"Unknown source format {source_format!r}; valid: {list(FORMATS)}.")
    kw = dict(num_heads=num_heads, image_size=image_size, mean=mean, std=std)
    if isinstance(source, nn.Module):
        return fold_input_normalization(_from_module(source, source_format, **kw))
    if isinstance(source, Mapping):
        fmt = source_format or detect_format(list(source))
        return fold_input_normalization(_from_state(dict(source), fmt, None, classifier, **kw))
    path = str(source)
    if source_format == "native" or (source_format is None and os.path.exists(path + ".index")):
        return _from_native(path, reference_config)
    if source_format == "vmoe_torch" or os.path.exists(os.path.join(path, "config.json")) and \
            (load_json(os.path.join(path, "config.json")) or {}).get("format") == "vmoe-torch":
        model = VisionTransformerMoe.from_pretrained(path)
        if model.config.moe is not None:
            raise SourceError(f"{path!r} is already a V-MoE; upcycling needs a dense model.")
        return DenseSource(model.config, model.state_dict(), description=f"vmoe-torch {path}")
    if path.endswith(".npz"):
        return fold_input_normalization(read_vit_jax(load_npz(path), classifier, image_size,
                                                     where=f"vit_jax {path}"))
    state = load_weights(path)
    fmt = source_format or detect_format(list(state))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return fold_input_normalization(_from_state(state, fmt, folder, classifier, **kw))


def _from_state(state: dict[str, Any], fmt: str, folder: Optional[str], classifier: Optional[str],
                **kw: Any) -> DenseSource:
    where = f"{fmt} {folder}" if folder else fmt
    given = {k: v for k, v in kw.items() if v is not None and k in ("mean", "std")}
    if fmt == "timm":
        return read_timm(state, kw.get("num_heads"), kw.get("image_size"), where=where, **given)
    if fmt == "torchvision":
        return read_torchvision(state, kw.get("num_heads"), kw.get("image_size"), where=where, **given)
    if fmt == "hf":
        cfg = load_json(os.path.join(folder, "config.json")) if folder else None
        pre = load_json(os.path.join(folder, "preprocessor_config.json")) if folder else None
        if given:
            pre = {"image_mean": given.get("mean"), "image_std": given.get("std")}
        if cfg is None and kw.get("num_heads"):
            cfg = {"num_attention_heads": kw["num_heads"]}
        return read_hf(state, cfg, pre, where=where)
    if fmt == "vit_jax":
        import numpy as np
        return read_vit_jax({k: np.asarray(v) for k, v in state.items()}, classifier, kw.get("image_size"))
    raise SourceError(f"Source format {fmt!r} needs a file path.")


def _from_native(prefix: str, reference_config: Optional[Mapping[str, Any]]) -> DenseSource:
    from ..convert.reference import load_reference_config, model_from_reference
    if reference_config is None:
        path = os.path.join(os.path.dirname(prefix), "config.json")
        if not os.path.exists(path):
            raise SourceError(f"A native checkpoint {prefix!r} needs its reference config "
                              "(config.json beside it, or --config).")
        reference_config = load_reference_config(path)
    model = model_from_reference(prefix, reference_config)
    if model.config.moe is not None:
        raise SourceError(f"{prefix!r} is already a V-MoE; upcycling needs a dense model.")
    return DenseSource(model.config, model.state_dict(), description=f"vmoe native {prefix}")


def dense_model(source: Source, source_format: Optional[str] = None, **kw: Any) -> VisionTransformerMoe:
    """Our dense twin of a dense ViT source, in eval mode (inputs in [-1, 1])."""
    src = read_dense(source, source_format, **kw)
    model = VisionTransformerMoe(src.config)
    _load(model, src.state)
    return model.eval()


def _load(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    from ..storage.pretrained import load_state_strict
    try:
        load_state_strict(model, state)
    except ValueError as e:
        raise SourceError(str(e)) from e


def _target_moe(dense: ModelConfig, model: Union[str, MoeConfig, ModelConfig]) -> MoeConfig:
    if isinstance(model, ModelConfig):
        if model.moe is None:
            raise SourceError("The target config has no MoE layers.")
        _check_backbone(dense, model)
        return model.moe
    if isinstance(model, MoeConfig):
        return model
    if "/" not in model:
        raise SourceError(f"{model!r}: give a full description such as 'ViT-B/16, E=8, K=2, Every 2' "
                          "(its backbone is checked against the source) or a MoeConfig.")
    parsed = parse_description(model, num_classes=max(dense.num_classes, 1), image_size=dense.image_size[0])
    if parsed.moe is None:
        raise SourceError(f"{model!r} has no experts (E=...).")
    _check_backbone(dense, parsed)
    # 8 images per routing group (the paper's) at the source's token count.
    group = 8 * dense.tokens_per_image * parsed.moe.ensemble_size
    return dataclasses.replace(parsed.moe, group_size=group)


def _check_backbone(dense: ModelConfig, target: ModelConfig) -> None:
    fields = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size")
    bad = [f"{f}: source {getattr(dense, f)} vs target {getattr(target, f)}" for f in fields
           if getattr(dense, f) != getattr(target, f)]
    if bad:
        raise SourceError("The target model does not have the source's backbone (mismatched "
                          f"width/depth): {bad}. Describe the source's size, e.g. 'ViT-B/16, ...'.")


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
      model: a description with the source's backbone ("ViT-B/16, E=8, K=2,
        Every 2", "... Last 2", "... Layers 1 3", "... M=2" for E^3), or a
        MoeConfig / ModelConfig.
      noise_std: each expert's weights get N(0, (noise_std * rms(W))^2) noise
        (seeded by `seed`, independent per expert) to break their symmetry;
        0 keeps exact copies.
      num_classes: a new, zero-initialised head with this many classes (the
        source's head is kept when None or equal).
      group_size: tokens per routing group (default 8 images).
      **routing: RoutingConfig changes, e.g. router="expert_choice",
        capacity_factor=2.0, num_selected_experts=1, batch_priority=True.
    """
    src = source if isinstance(source, DenseSource) else read_dense(source, source_format,
                                                                    **dict(read_options or {}))
    if src.config.moe is not None:
        raise SourceError("The source is already a V-MoE.")
    moe = _target_moe(src.config, model)
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
    _load(out, upcycled_state(src.state, cfg, out.state_dict(), noise_std, seed))
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
