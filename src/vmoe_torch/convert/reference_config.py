"""Reference model kwargs (vmoe `VisionTransformerMoe(**kwargs)`) -> ModelConfig."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from ..config.model import ModelConfig, MoeConfig, as_pair
from ..config.routing import RoutingConfig

# Keys that only matter for training, sharding or the JAX runtime.
_IGNORED = {"deterministic", "dtype", "partition_spec", "split_rngs", "einsum_precision",
            "encoder_cls", "name"}
_ROUTERS = {"NoisyTopExpertsPerItemRouter": "top_experts",
            "NoisyTopExpertsPerItemEnsembleRouter": "top_experts",
            "NoisyTopItemsPerExpertRouter": "expert_choice",
            "SoftRouter": "soft"}
# Reference names we write back (the reference imports dotted names).
_REFERENCE_NAMES = {"top_experts": "NoisyTopExpertsPerItemRouter",
                    "expert_choice": "NoisyTopItemsPerExpertRouter",
                    "soft": "vmoe.projects.soft_moe.router.SoftRouter"}
_ENSEMBLE_CLASSES = ("VisionTransformerMoeEnsemble",)


def _take(d: Mapping[str, Any], known: set[str], where: str) -> dict[str, Any]:
    unknown = sorted(set(d) - known - _IGNORED)
    if unknown:
        raise ValueError(f"Reference config {where} has keys this converter does not "
                         f"support: {unknown}. Supported: {sorted(known)}.")
    return {k: v for k, v in d.items() if k in known}


def router_kind(name: str) -> str:
    """Our router name for a reference router name, bare or dotted
    ('vmoe.projects.soft_moe.router.SoftRouter' -> 'soft')."""
    short = name.rsplit(".", 1)[-1]
    if short not in _ROUTERS:
        raise ValueError(f"Unsupported router {name!r}; supported: {sorted(_ROUTERS)} "
                         "(bare or as dotted module paths).")
    return _ROUTERS[short]


def _soft_routing(router: Mapping[str, Any]) -> RoutingConfig:
    r = _take(router, {"name", "num_slots", "capacity_factor", "noise_std",
                       "compute_similarity_metrics"}, "moe.router (SoftRouter)")
    num_slots = r.get("num_slots")
    # Reference default capacity_factor=1.0; ignored when num_slots is set.
    factor = r.get("capacity_factor", 1.0)
    return RoutingConfig(router="soft", num_slots=num_slots,
                         capacity_factor=None if factor is None else float(factor), capacity=None,
                         noise_std=float(r.get("noise_std", 0.0)), bfloat16_dispatch=True)


def _routing(router: Mapping[str, Any]) -> RoutingConfig:
    kind = router_kind(router.get("name", "NoisyTopExpertsPerItemRouter"))
    if kind == "soft":
        return _soft_routing(router)
    r = _take(router, {"num_selected_experts", "noise_std", "importance_loss_weight",
                       "load_loss_weight", "gshard_loss_weight", "dispatcher", "name"}, "moe.router")
    disp = _take(r.pop("dispatcher", {}) or {}, {
        "name", "batch_priority", "capacity", "capacity_factor", "capacity_ceil_or_round",
        "capacity_multiple_of", "bfloat16"}, "moe.router.dispatcher")
    impl = disp.pop("name", "einsum")  # einsum vs indices: same result, we use index dispatch
    if impl not in ("einsum", "indices"):
        raise ValueError(f"Unknown reference dispatcher name {impl!r}; valid: 'einsum', 'indices'.")
    kw: dict[str, Any] = {"router": kind}
    kw.update({k: v for k, v in r.items() if k != "name"})
    kw["bfloat16_dispatch"] = bool(disp.pop("bfloat16", False))
    kw.update(disp)
    kw.setdefault("capacity_factor", None)   # the reference has no defaults for these
    kw.setdefault("capacity", None)
    return RoutingConfig(**kw)


def config_from_reference(kwargs: Mapping[str, Any], params: Optional[Mapping[str, np.ndarray]] = None,
                          image_size: Optional[int | tuple[int, int]] = None,
                          model_class: str = "VisionTransformerMoe") -> ModelConfig:
    """Builds our ModelConfig from the reference constructor kwargs.

    `image_size` is the size the learned position embedding is for; when not
    given it is inferred from `params` (a square grid), else 224.
    `model_class` "VisionTransformerMoeEnsemble" (E^3) requires
    `encoder.moe.ensemble_size` and always uses learned position embeddings,
    as the reference's ensemble encoder does.
    """
    model_class = str(kwargs.get("name") or model_class)  # vmoe configs name the class
    short_class = model_class.rsplit(".", 1)[-1]
    if short_class not in ("VisionTransformerMoe",) + _ENSEMBLE_CLASSES:
        raise ValueError(f"Unsupported reference model class {model_class!r}; supported: "
                         "VisionTransformerMoe, VisionTransformerMoeEnsemble.")
    ensemble = short_class in _ENSEMBLE_CLASSES
    top = _take(kwargs, {"num_classes", "patch_size", "hidden_size", "encoder", "classifier",
                         "representation_size", "head_bias_init", "head_kernel_zero_init"}, "(top level)")
    enc = _take(top.get("encoder", {}), {"num_layers", "mlp_dim", "num_heads", "dropout_rate",
                                         "attention_dropout_rate", "moe", "position_emb",
                                         "attention_qk_norm"}, "encoder")
    patch = as_pair(top["patch_size"])
    pos = "learned" if ensemble else (enc.get("position_emb") or {}).get("name", "learned")
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
                               "mlp_dim", "ensemble_size"}, "encoder.moe")
        if ensemble and not m.get("ensemble_size"):
            raise ValueError("VisionTransformerMoeEnsemble needs encoder.moe.ensemble_size >= 1.")
        if not ensemble and m.get("ensemble_size") not in (None, 1):
            raise ValueError("encoder.moe.ensemble_size is an E^3 setting: set model_class "
                             "VisionTransformerMoeEnsemble.")
        moe = MoeConfig(layers=tuple(m.get("layers", ())), num_experts=int(m["num_experts"]),
                        group_size=m.get("group_size"), mlp_dim=m.get("mlp_dim"),
                        dropout_rate=m.get("dropout_rate"), routing=_routing(m.get("router") or {}),
                        ensemble_size=int(m.get("ensemble_size") or 1))
    cfg = ModelConfig(
        num_classes=int(top.get("num_classes") or 0), image_size=as_pair(image_size), patch_size=patch,
        hidden_size=int(top["hidden_size"]), num_layers=int(enc["num_layers"]),
        num_heads=int(enc["num_heads"]), mlp_dim=int(enc["mlp_dim"]), classifier=classifier,
        representation_size=top.get("representation_size"), position_emb=pos,  # type: ignore[arg-type]
        dropout_rate=float(enc.get("dropout_rate", 0.0)),
        attention_dropout_rate=float(enc.get("attention_dropout_rate", 0.0)),
        head_bias_init=float(top.get("head_bias_init", 0.0)),
        head_kernel_zero_init=bool(top.get("head_kernel_zero_init", True)), moe=moe,
        # The reference's ensemble encoder does not pass attention_qk_norm to its blocks.
        qk_norm=bool(enc.get("attention_qk_norm", False)) and not ensemble)
    cfg.validate()
    return cfg


def config_to_reference(cfg: ModelConfig) -> dict[str, Any]:
    """Inverse of `config_from_reference` (reference constructor kwargs).
    Raises for settings the reference model cannot express (rather than
    exporting a different model)."""
    unsupported = [msg for bad, msg in (
        (cfg.gelu != "tanh", "exact (erf) GELU: the reference uses the tanh approximation"),
        (cfg.layer_norm_eps != 1e-6, f"LayerNorm eps {cfg.layer_norm_eps}: the reference uses 1e-6"),
        (cfg.norm_after_pool, "norm_after_pool (timm's fc_norm)"),
        (cfg.in_chans != 3, f"{cfg.in_chans} input channels")) if bad]
    if unsupported:
        raise ValueError("The reference's VisionTransformerMoe does not support: "
                         + "; ".join(unsupported) + ". Keep this model in our format (save_pretrained).")
    enc: dict[str, Any] = {"num_layers": cfg.num_layers, "mlp_dim": cfg.mlp_dim,
                           "num_heads": cfg.num_heads, "dropout_rate": cfg.dropout_rate,
                           "attention_dropout_rate": cfg.attention_dropout_rate}
    if cfg.position_emb != "learned":
        enc["position_emb"] = {"name": cfg.position_emb}
    if cfg.qk_norm:
        enc["attention_qk_norm"] = True
    if cfg.moe is not None:
        if cfg.moe.layer_routing:
            raise ValueError("The reference format has one routing for all MoE layers; this model "
                             "routes some layers differently (moe.layer_routing).")
        enc["moe"] = {"layers": list(cfg.moe.layers), "num_experts": cfg.moe.num_experts,
                      "group_size": cfg.moe.group_size, "router": _router_to_reference(cfg.moe.routing)}
        if cfg.moe.mlp_dim is not None:
            enc["moe"]["mlp_dim"] = cfg.moe.mlp_dim
        if cfg.moe.dropout_rate is not None:
            enc["moe"]["dropout_rate"] = cfg.moe.dropout_rate
        if cfg.moe.ensemble_size > 1:
            enc["moe"]["ensemble_size"] = cfg.moe.ensemble_size
    return {"name": reference_model_class(cfg),
            "num_classes": cfg.num_classes or None, "patch_size": list(cfg.patch_size),
            "hidden_size": cfg.hidden_size, "classifier": cfg.classifier,
            "representation_size": cfg.representation_size, "head_bias_init": cfg.head_bias_init,
            "encoder": enc}


def reference_model_class(cfg: ModelConfig) -> str:
    """The reference class that builds `cfg`."""
    ensemble = cfg.moe is not None and cfg.moe.ensemble_size > 1
    return "VisionTransformerMoeEnsemble" if ensemble else "VisionTransformerMoe"


def _router_to_reference(r: RoutingConfig) -> dict[str, Any]:
    router: dict[str, Any] = {"name": _REFERENCE_NAMES[r.router], "noise_std": r.effective_noise_std}
    if r.router == "soft":
        router.update(num_slots=r.num_slots, capacity_factor=r.capacity_factor,
                      compute_similarity_metrics=True)
        return router
    disp: dict[str, Any] = {"name": "einsum" if r.router == "expert_choice" else "indices",
                            "capacity_ceil_or_round": r.capacity_ceil_or_round,
                            "capacity_multiple_of": r.capacity_multiple_of}
    if r.capacity is not None:
        disp["capacity"] = r.capacity
    else:
        disp["capacity_factor"] = r.capacity_factor
    if r.effective_bfloat16:
        disp["bfloat16"] = True
    if r.router == "top_experts":
        disp["batch_priority"] = r.batch_priority
        router.update(num_selected_experts=r.num_selected_experts,
                      importance_loss_weight=r.importance_loss_weight,
                      load_loss_weight=r.load_loss_weight, gshard_loss_weight=r.gshard_loss_weight)
    router["dispatcher"] = disp
    return router
