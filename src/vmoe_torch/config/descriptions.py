"""Backbone size table, MoE placement rules and the paper's model descriptions.

"ViT-S/32, E=8, K=2, Last 2" -> a `ModelConfig`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from .model import ModelConfig, MoeConfig
from .routing import RoutingConfig


@dataclass(frozen=True)
class Backbone:
    hidden_size: int
    num_layers: int
    mlp_dim: int
    num_heads: int


# The paper's S/B/L/H (Table 8 of arXiv 2106.05974), ViT-Ti, and a CPU-sized "Mi".
BACKBONES: dict[str, Backbone] = {
    "Mi": Backbone(64, 6, 128, 4),
    "Ti": Backbone(192, 12, 768, 3),
    "S": Backbone(512, 8, 2048, 8),
    "B": Backbone(768, 12, 3072, 12),
    "L": Backbone(1024, 24, 4096, 16),
    "H": Backbone(1280, 32, 5120, 16),
}


def every_n(num_layers: int, n: int) -> tuple[int, ...]:
    """"Every n": blocks n-1, 2n-1, ... (Every 2 on 12 blocks: 1, 3, ..., 11)."""
    if n < 1:
        raise ValueError(f"'Every n' needs n >= 1, got {n}.")
    return tuple(range(n - 1, num_layers, n))


def second_half(num_layers: int) -> tuple[int, ...]:
    """"Second half": every block of the second half (Soft MoE's placement;
    12 blocks: 6..11)."""
    return tuple(range(num_layers // 2, num_layers))


# The ViT sizes of "Scaling Vision Transformers" that the Soft MoE paper
# builds on (reference soft_moe/configs/common.py); S differs from V-MoE's S.
VIT_BACKBONES: dict[str, Backbone] = {
    "Mi": BACKBONES["Mi"],  # CPU-sized, shared with the V-MoE table
    "Ti": Backbone(192, 12, 768, 3),
    "S": Backbone(384, 12, 1536, 6),
    "B": Backbone(768, 12, 3072, 12),
    "L": Backbone(1024, 24, 4096, 16),
    "H": Backbone(1280, 32, 5120, 16),
}


def last_n(num_layers: int, n: int) -> tuple[int, ...]:
    """"Last n": the last n odd blocks (Last 2 on 8 blocks: 5, 7)."""
    odd = list(range(1, num_layers, 2))
    if not 1 <= n <= len(odd):
        raise ValueError(f"'Last {n}' needs 1 <= n <= {len(odd)} odd blocks of {num_layers}.")
    return tuple(odd[-n:])


_DESCRIPTION = re.compile(
    r"^\s*(?P<family>soft[- ]?moe|v-?moe|vit)-(?P<size>mi|ti|s|b|l|h)/(?P<patch>\d+)"
    r"(?P<opts>(?:\s*,\s*[^,]+)*)\s*$", re.IGNORECASE)


@dataclass
class _Options:
    """The options of a description after the size: E=, K=, C=, M=, p=, placement."""

    experts: Optional[int] = None
    k: Optional[int] = None
    capacity_factor: float = 1.05
    members: int = 1
    slots: Optional[int] = None
    layers: Optional[tuple[Any, ...]] = None  # ("every" | "last" | "half", n) or explicit indices


def _parse_options(opts: list[str], text: str) -> _Options:
    o = _Options()
    for opt in opts:
        low = opt.lower().replace(" ", "")
        if low.startswith("e="):
            o.experts = int(low[2:])
        elif low.startswith("k="):
            o.k = int(low[2:])
        elif low.startswith("c="):
            o.capacity_factor = float(low[2:])
        elif low.startswith("m="):
            o.members = int(low[2:])
        elif low.startswith("p="):
            o.slots = int(low[2:])
        elif low in ("secondhalf", "half"):
            o.layers = ("half", 0)
        elif low.startswith("every"):
            o.layers = ("every", int(low[5:]))
        elif low.startswith("last"):
            o.layers = ("last", int(low[4:]))
        elif low.endswith("epochs"):
            continue  # training length, not part of the model
        elif low.startswith("layers"):
            o.layers = tuple(int(x) for x in opt.split()[1:])
        else:
            raise ValueError(f"Unknown option {opt!r} in model description {text!r}; "
                             "known: E=, K=, C=, M=, p=, Every n, Last n, Second half, Layers i j ...")
    return o


def _placement(layers: tuple[Any, ...], num_layers: int) -> tuple[int, ...]:
    """MoE block indices of a placement ("every" | "last" | "half", n) or explicit indices."""
    if layers and layers[0] == "every":
        return every_n(num_layers, layers[1])
    if layers and layers[0] == "last":
        return last_n(num_layers, layers[1])
    if layers and layers[0] == "half":
        return second_half(num_layers)
    return tuple(layers)


def parse_description(text: str, num_classes: int = 1000,
                      image_size: Optional[int] = None) -> ModelConfig:
    """Parses a paper description such as "ViT-S/32, E=8, K=2, Last 2" or
    "V-MoE-B/16, E=32, K=2, Every 2, C=1.05". Without E the model is dense.
    A trailing "300 Epochs" (the reference's form) is accepted and ignored.
    "M=2" makes it an E^3 ensemble of 2 members (the group then holds 8
    images per member); "Second half" puts MoE in every block of the second
    half. "Soft MoE-S/16, E=128, p=1" is a Soft MoE (`soft_moe_config`).

    The other settings follow the paper's configs: group size of 8 images'
    worth of tokens, representation layer, head bias -log(num_classes),
    auxiliary loss weights 0.005, capacity factor 1.05, bfloat16 dispatch.
    """
    m = _DESCRIPTION.match(text)
    if not m:
        raise ValueError(
            f"Cannot parse model description {text!r}. Expected e.g. "
            "'ViT-S/32, E=8, K=2, Last 2' or 'Soft MoE-B/16, E=128, p=1' (sizes: Mi, Ti, S, B, L, H; "
            "placement: 'Every n', 'Last n' or 'Layers 1 3 5').")
    size = next(k for k in BACKBONES if k.lower() == m["size"].lower())
    patch = int(m["patch"])
    o = _parse_options([x.strip() for x in m["opts"].split(",") if x.strip()], text)
    if image_size is None:
        image_size = 32 if size == "Mi" else 224
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}.")
    if m["family"].lower().startswith("soft"):
        if o.experts is None or o.slots is None:
            raise ValueError(f"A Soft MoE description needs E= and p= (slots per expert), got {text!r}.")
        return soft_moe_config(size, patch, o.experts, o.slots, image_size, num_classes)
    return _vmoe_config(BACKBONES[size], patch, o, image_size, num_classes, text)


def _vmoe_config(bb: Backbone, patch: int, o: _Options, image_size: int, num_classes: int,
                 text: str) -> ModelConfig:
    # The paper's settings (reference vmoe_paper/common.py): token classifier,
    # representation layer of the hidden size, head bias -log(classes).
    base: dict[str, Any] = dict(num_classes=num_classes, image_size=(image_size, image_size),
                patch_size=(patch, patch), hidden_size=bb.hidden_size, num_layers=bb.num_layers,
                num_heads=bb.num_heads, mlp_dim=bb.mlp_dim, classifier="token",
                representation_size=bb.hidden_size,
                head_bias_init=-math.log(num_classes) if num_classes > 1 else 0.0)
    if o.experts is None:
        if o.k is not None or o.layers is not None:
            raise ValueError(f"{text!r} sets K or MoE layers but no number of experts E=.")
        return ModelConfig(**base)
    tokens = (image_size // patch) ** 2 + 1
    # Paper: aux loss weights 0.005 each, bfloat16 dispatch, vanilla routing in training.
    routing = RoutingConfig(num_selected_experts=o.k or 1, capacity_factor=o.capacity_factor,
                            importance_loss_weight=0.005, load_loss_weight=0.005,
                            bfloat16_dispatch=True)
    placement = o.layers if o.layers is not None else ("every", 2)
    moe = MoeConfig(layers=_placement(placement, bb.num_layers), num_experts=o.experts,
                    group_size=8 * tokens * o.members, routing=routing, ensemble_size=o.members)
    cfg = ModelConfig(**base, moe=moe)
    cfg.validate()
    return cfg


def soft_moe_config(size: str, patch: int, num_experts: int, num_slots: int,
                    image_size: int = 224, num_classes: int = 1000) -> ModelConfig:
    """A Soft MoE model as in the paper (arXiv 2308.00951) and the reference's
    soft_moe configs: ViT backbone of "Scaling ViT" sizes, GAP head, qk-norm,
    MoE in every block of the second half, one image per routing group."""
    bb = VIT_BACKBONES[size]
    tokens = (image_size // patch) ** 2
    routing = RoutingConfig(router="soft", num_slots=num_slots, capacity_factor=None)
    moe = MoeConfig(layers=second_half(bb.num_layers), num_experts=num_experts, group_size=tokens,
                    routing=routing)
    return ModelConfig(num_classes=num_classes, image_size=(image_size, image_size),
                       patch_size=(patch, patch), hidden_size=bb.hidden_size,
                       num_layers=bb.num_layers, num_heads=bb.num_heads, mlp_dim=bb.mlp_dim,
                       classifier="gap", head_bias_init=-math.log(num_classes), moe=moe,
                       qk_norm=True)


def parse_moe_description(text: str, num_layers: int, tokens_per_image: int) -> MoeConfig:
    """The MoE part of a description alone, for a backbone that is already
    known (upcycling reads it from the dense source): "E=8, K=2, Every 2",
    "E=8, K=1, M=2, Last 2", "E=16, p=1, Second half" (Soft MoE: p slots per
    expert, one image per group). Settings as in `parse_description`:
    V-MoE groups hold 8 images' tokens per member, placement defaults to
    "Every 2" (Soft MoE: "Second half"), auxiliary loss weights 0.005,
    capacity factor 1.05, bfloat16 dispatch."""
    if "/" in text or text.strip().lower().startswith(("vit", "v-moe", "vmoe", "soft")):
        raise ValueError(f"{text!r} names a backbone; give only the MoE part, e.g. 'E=8, K=2, Every 2'.")
    o = _parse_options([x.strip() for x in text.split(",") if x.strip()], text)
    if o.experts is None:
        raise ValueError(f"{text!r} has no number of experts: give E=, e.g. 'E=8, K=2, Every 2'.")
    if o.slots is not None:
        if o.k is not None or o.members != 1:
            raise ValueError(f"{text!r}: a Soft MoE (p=) takes no K= or M=.")
        layers = _placement(o.layers if o.layers is not None else ("half", 0), num_layers)
        routing = RoutingConfig(router="soft", num_slots=o.slots, capacity_factor=None)
        return MoeConfig(layers=layers, num_experts=o.experts, group_size=tokens_per_image, routing=routing)
    routing = RoutingConfig(num_selected_experts=o.k or 1, capacity_factor=o.capacity_factor,
                            importance_loss_weight=0.005, load_loss_weight=0.005, bfloat16_dispatch=True)
    layers = _placement(o.layers if o.layers is not None else ("every", 2), num_layers)
    return MoeConfig(layers=layers, num_experts=o.experts, group_size=8 * tokens_per_image * o.members,
                     routing=routing, ensemble_size=o.members)
