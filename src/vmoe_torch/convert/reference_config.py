"""Reference model kwargs (vmoe `VisionTransformerMoe(**kwargs)`) -> ModelConfig."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from ..models.config import ModelConfig, MoeConfig, as_pair
from ..moe.config import RoutingConfig

# Keys that only matter for training, sharding or the JAX runtime.
_IGNORED = {"deterministic", "dtype", "partition_spec", "split_rngs", "einsum_precision",
            "encoder_cls", "name"}
_ROUTERS = {"NoisyTopExpertsPerItemRouter": "top_experts",
            "NoisyTopItemsPerExpertRouter": "expert_choice"}


def _take(d: Mapping[str, Any], known: set[str], where: str) -> dict[str, Any]:
    unknown = sorted(set(d) - known - _IGNORED)
    if unknown:
        raise ValueError(f"Reference config {where} has keys this converter does not "
                         f"support: {unknown}. Supported: {sorted(known)}.")
    return {k: v for k, v in d.items() if k in known}


def _routing(router: Mapping[str, Any]) -> RoutingConfig:
    r = _take(router, {"num_selected_experts", "noise_std", "importance_loss_weight",
                       "load_loss_weight", "gshard_loss_weight", "dispatcher", "name"}, "moe.router")
    name = router.get("name", "NoisyTopExpertsPerItemRouter")
    if name not in _ROUTERS:
        raise ValueError(f"Unsupported router {name!r}; supported: {sorted(_ROUTERS)}.")
    disp = _take(r.pop("dispatcher", {}) or {}, {
        "name", "batch_priority", "capacity", "capacity_factor", "capacity_ceil_or_round",
        "capacity_multiple_of", "bfloat16"}, "moe.router.dispatcher")
    disp.pop("name", None)  # einsum vs indices: same result, we always use index dispatch
    kw: dict[str, Any] = {"router": _ROUTERS[name]}
    kw.update({k: v for k, v in r.items() if k != "name"})
    if "bfloat16" in disp:
        kw["bfloat16_dispatch"] = bool(disp.pop("bfloat16"))
    kw.update(disp)
    if kw.get("capacity") is not None:
        kw.setdefault("capacity_factor", None)
    else:
        kw.setdefault("capacity_factor", None)
        kw["capacity"] = None
    return RoutingConfig(**kw)


def config_from_reference(kwargs: Mapping[str, Any], params: Optional[Mapping[str, np.ndarray]] = None,
                          image_size: Optional[int | tuple[int, int]] = None) -> ModelConfig:
    """Builds our ModelConfig from the reference constructor kwargs.

    `image_size` is the size the learned position embedding is for; when not
    given it is inferred from `params` (a square grid), else 224.
    """
    top = _take(kwargs, {"num_classes", "patch_size", "hidden_size", "encoder", "classifier",
                         "representation_size", "head_bias_init", "head_kernel_zero_init"}, "(top level)")
    enc = _take(top.get("encoder", {}), {"num_layers", "mlp_dim", "num_heads", "dropout_rate",
                                         "attention_dropout_rate", "moe", "position_emb",
                                         "attention_qk_norm"}, "encoder")
    if enc.get("attention_qk_norm"):
        raise ValueError("attention_qk_norm=True is not supported yet.")
    patch = as_pair(top["patch_size"])
    pos = (enc.get("position_emb") or {}).get("name", "learned")
    if (enc.get("position_emb") or {}).get("temperature", 10_000.0) != 10_000.0:
        raise ValueError("Only the default sincos2d temperature (10000) is supported.")
    classifier = top.get("classifier", "token")
    if image_size is None and params is not None and "Encoder/posembed_input/pos_embedding" in params:
        n = params["Encoder/posembed_input/pos_embedding"].shape[1] - (1 if classifier == "token" else 0)
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ValueError(f"Cannot infer a square grid from {n} position embeddings; pass image_size.")
        image_size = (side * patch[0], side * patch[1])
    if image_size is None:
        image_size = (math.ceil(224 / patch[0]) * patch[0], math.ceil(224 / patch[1]) * patch[1])
    moe = None
    if enc.get("moe"):
        m = _take(enc["moe"], {"layers", "num_experts", "group_size", "router", "dropout_rate",
                               "mlp_dim"}, "encoder.moe")
        moe = MoeConfig(layers=tuple(m.get("layers", ())), num_experts=int(m["num_experts"]),
                        group_size=m.get("group_size"), mlp_dim=m.get("mlp_dim"),
                        routing=_routing(m.get("router") or {}))
    cfg = ModelConfig(
        num_classes=int(top.get("num_classes") or 0), image_size=as_pair(image_size), patch_size=patch,
        hidden_size=int(top["hidden_size"]), num_layers=int(enc["num_layers"]),
        num_heads=int(enc["num_heads"]), mlp_dim=int(enc["mlp_dim"]), classifier=classifier,
        representation_size=top.get("representation_size"), position_emb=pos,
        dropout_rate=float(enc.get("dropout_rate", 0.0)),
        attention_dropout_rate=float(enc.get("attention_dropout_rate", 0.0)),
        head_bias_init=float(top.get("head_bias_init", 0.0)),
        head_kernel_zero_init=bool(top.get("head_kernel_zero_init", True)), moe=moe)
    cfg.validate()
    return cfg


def config_to_reference(cfg: ModelConfig) -> dict[str, Any]:
    """Inverse of `config_from_reference` (reference constructor kwargs)."""
    enc: dict[str, Any] = {"num_layers": cfg.num_layers, "mlp_dim": cfg.mlp_dim,
                           "num_heads": cfg.num_heads, "dropout_rate": cfg.dropout_rate,
                           "attention_dropout_rate": cfg.attention_dropout_rate}
    if cfg.position_emb != "learned":
        enc["position_emb"] = {"name": cfg.position_emb}
    if cfg.moe is not None:
        r = cfg.moe.routing
        disp: dict[str, Any] = {"name": "indices", "batch_priority": r.batch_priority,
                                "capacity_ceil_or_round": r.capacity_ceil_or_round,
                                "capacity_multiple_of": r.capacity_multiple_of}
        if r.capacity is not None:
            disp["capacity"] = r.capacity
        else:
            disp["capacity_factor"] = r.capacity_factor
        if r.bfloat16_dispatch:
            disp["bfloat16"] = True
        router: dict[str, Any] = {"noise_std": r.noise_std, "dispatcher": disp}
        if r.router == "expert_choice":
            router["name"] = "NoisyTopItemsPerExpertRouter"
            disp.pop("name"), disp.pop("batch_priority")
            disp["name"] = "einsum"
        else:
            router.update(num_selected_experts=r.num_selected_experts,
                          importance_loss_weight=r.importance_loss_weight,
                          load_loss_weight=r.load_loss_weight, gshard_loss_weight=r.gshard_loss_weight)
        enc["moe"] = {"layers": list(cfg.moe.layers), "num_experts": cfg.moe.num_experts,
                      "group_size": cfg.moe.group_size, "router": router}
    return {"num_classes": cfg.num_classes or None, "patch_size": list(cfg.patch_size),
            "hidden_size": cfg.hidden_size, "classifier": cfg.classifier,
            "representation_size": cfg.representation_size, "head_bias_init": cfg.head_bias_init,
            "encoder": enc}
