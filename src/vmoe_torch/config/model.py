"""Typed model configuration (mirrors the reference's constructor kwargs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .routing import RoutingConfig, check_group_size

Classifier = Literal["token", "gap", "map"]
PositionEmb = Literal["learned", "sincos2d", "none"]


@dataclass(frozen=True)
class LayerRouting:
    """Routing of one MoE block that differs from `MoeConfig.routing`."""

    layer: int
    routing: RoutingConfig


@dataclass(frozen=True)
class MoeConfig:
    """Which blocks are sparse and how their experts are built.

    Attributes:
      layers: indices of the blocks whose MLP is an MoE.
      num_experts: E.
      group_size: tokens per routing group (None: the whole batch); the paper
        uses 8 images' worth of tokens. With an ensemble (E^3) the groups are
        cut after the M copies are interleaved, so it counts B*N*M tokens.
      mlp_dim: hidden size of each expert (None: the model's mlp_dim).
      dropout_rate: dropout inside the experts (None: the model's
        dropout_rate), the reference's `encoder.moe.dropout_rate`.
      routing: the routing settings of every MoE layer ...
      layer_routing: ... except these blocks, which run their own settings
        (what a per-layer `set_routing` leaves behind, so it is saved too).
      ensemble_size: M; > 1 makes the model an E^3 efficient ensemble
        (arXiv 2110.03360): inputs are repeated M times before the first MoE
        block and member m routes among experts m*E/M ... (m+1)*E/M - 1.
    """

    layers: tuple[int, ...] = ()
    num_experts: int = 8
    group_size: Optional[int] = None
    mlp_dim: Optional[int] = None
    dropout_rate: Optional[float] = None
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    layer_routing: tuple[LayerRouting, ...] = ()
    ensemble_size: int = 1

    def routing_for(self, layer: int) -> RoutingConfig:
        """The routing block `layer` runs with."""
        for entry in self.layer_routing:
            if entry.layer == layer:
                return entry.routing
        return self.routing

    def validate(self, num_layers: int) -> None:
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"MoE layers {bad} are outside the {num_layers} blocks "
                             f"(valid: 0..{num_layers - 1}).")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
        if self.dropout_rate is not None and not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"moe.dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        stray = sorted({e.layer for e in self.layer_routing} - set(self.layers))
        if stray:
            raise ValueError(f"layer_routing names blocks {stray} that are not MoE blocks "
                             f"{sorted(self.layers)}.")
        m = self.ensemble_size
        if m < 1 or self.num_experts % m:
            raise ValueError(f"ensemble_size must be >= 1 and divide num_experts="
                             f"{self.num_experts}, got {m}.")
        check_group_size(self.group_size, m)
        for routing in [self.routing] + [e.routing for e in self.layer_routing]:
            routing.validate(self.num_experts)
            if routing.router == "soft" and routing.num_slots is None and self.group_size is None:
                raise ValueError("Soft MoE sizes its slots from group_size * capacity_factor / E: "
                                 "set moe.group_size, or routing.num_slots.")
            if m > 1:
                if routing.router != "top_experts":
                    raise ValueError(f"An E^3 ensemble (ensemble_size={m}) routes with "
                                     f"'top_experts', not {routing.router!r}.")
                if routing.num_selected_experts > self.num_experts // m:
                    raise ValueError(
                        f"K={routing.num_selected_experts} exceeds the {self.num_experts // m} "
                        f"experts of each of the {m} ensemble members.")


@dataclass(frozen=True)
class ModelConfig:
    """A V-MoE (or, with `moe=None`, a dense ViT).

    Attributes:
      num_classes: head outputs; 0 means no head (features only).
      image_size: (H, W) the learned position embedding is built for.
      patch_size: (ph, pw).
      hidden_size, num_layers, num_heads, mlp_dim: the backbone.
      classifier: "token" (class token), "gap" (mean over tokens) or "map"
        (multi-head attention pooling).
      representation_size: size of the optional Dense+tanh pre-logits layer.
      position_emb: "learned", "sincos2d" or "none".
      dropout_rate, attention_dropout_rate: as in ViT.
      head_bias_init: constant head bias (the paper: -log(num_classes)).
      head_kernel_zero_init: zero-initialise the head kernel.
      moe: the MoE layers, or None for a dense ViT.
      in_chans: image channels.
      check_finite: raise on non-finite input images (costs a reduction).
      qk_norm: LayerNorm on attention queries and keys (the reference's
        `attention_qk_norm`, used by its Soft MoE models).
      layer_norm_eps: epsilon of every LayerNorm (flax and timm: 1e-6;
        Hugging Face ViT: 1e-12).
      gelu: "tanh" (the approximation flax uses) or "erf" (exact GELU, as
        timm, torchvision and Hugging Face ViTs), in the MLPs and experts.
      norm_after_pool: with classifier "gap", apply the encoder LayerNorm to
        the pooled vector instead of to every token (timm's `fc_norm`).
      drop_path_rate: stochastic depth, rising linearly over the blocks to
        this rate on each residual branch (training only; timm's rule).
      dynamic_img_size: accept any image size that is a multiple of the
        patch, resampling the learned position embedding on the fly.
    """

    num_classes: int = 1000
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    classifier: Classifier = "token"
    representation_size: Optional[int] = None
    position_emb: PositionEmb = "learned"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    head_bias_init: float = 0.0
    head_kernel_zero_init: bool = True
    moe: Optional[MoeConfig] = None
    in_chans: int = 3
    check_finite: bool = False
    qk_norm: bool = False
    layer_norm_eps: float = 1e-6
    gelu: Literal["tanh", "erf"] = "tanh"
    norm_after_pool: bool = False
    drop_path_rate: float = 0.0
    dynamic_img_size: bool = False

    def validate(self) -> None:
        """Raises ValueError naming any inconsistent setting."""
        if self.classifier not in ("token", "gap", "map"):
            raise ValueError(f"Unknown classifier {self.classifier!r}: use 'token', 'gap' or 'map'.")
        if self.position_emb not in ("learned", "sincos2d", "none"):
            raise ValueError(
                f"Unknown position_emb {self.position_emb!r}: use 'learned', 'sincos2d' or 'none'.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")
        for name, size in (("image_size", self.image_size), ("patch_size", self.patch_size)):
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"{name} must be two positive ints, got {size}.")
        if self.image_size[0] % self.patch_size[0] or self.image_size[1] % self.patch_size[1]:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}.")
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"gelu must be 'tanh' or 'erf', got {self.gelu!r}.")
        if self.norm_after_pool and self.classifier != "gap":
            raise ValueError("norm_after_pool applies to classifier='gap' only.")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}.")
        if self.moe is not None:
            self.moe.validate(self.num_layers)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid
        return h * w + (1 if self.classifier == "token" else 0)


def as_pair(v: Union[int, tuple[int, int], list[int]]) -> tuple[int, int]:
    """An int n as (n, n), or a pair of ints; anything else is refused."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"Expected an int or a pair of ints (height, width), got {v!r}.")
