"""Typed configuration of the contrastive image-text models (the reference's
`projects/contrastive` two-tower model, and LIMoE's one shared backbone)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from .model import ModelConfig, MoeConfig

TextPool = Literal["last", "first", "gap", "gmp"]


@dataclass(frozen=True)
class TextConfig:
    """The text tower (the reference's `TextTransformer`): token embedding,
    learned position embedding, pre-LN blocks (MoE where `moe` places them),
    a final LayerNorm and pooling ("last": the last position, where the
    reference's padding puts the end-of-text token).

    Attributes:
      vocab_size: the tokenizer's vocabulary size.
      max_len: tokens per text (shorter texts are padded).
    """

    vocab_size: int = 64
    max_len: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    pool: TextPool = "last"
    moe: Optional[MoeConfig] = None

    def as_model_config(self) -> ModelConfig:
        """The block settings as a ModelConfig (what `build_block` reads)."""
        return dataclasses.replace(ModelConfig(), num_classes=0, hidden_size=self.hidden_size,
                                   num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                   moe=self.moe)

    def validate(self) -> None:
        for name in ("vocab_size", "max_len", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"text.{name} must be >= 1, got {getattr(self, name)}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text.hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}.")
        if self.pool not in ("last", "first", "gap", "gmp"):
            raise ValueError(f"text.pool must be 'last', 'first', 'gap' or 'gmp', got {self.pool!r}.")
        if self.moe is not None:
            self.moe.validate(self.num_layers)


@dataclass(frozen=True)
class ContrastiveConfig:
    """An image-text model trained with the reference's sigmoid loss.

    Attributes:
      image: the image tower (any of our models; its head projects to
        `embed_dim`, so `image.num_classes` is set to it).
      text: the text tower, or with `shared`, only its vocabulary, length
        and pooling.
      embed_dim: the joint embedding size.
      scale_init, bias_init: the logit scale (learned in log space) and the
        optional learned bias, as the reference's `TwoTower` (defaults 1.0
        and None; SigLIP uses 10 and -10).
      shared: LIMoE's multimodal model: one backbone (the image tower's
        blocks and final norm) encodes both modalities, each with its own
        embedding, pooling and projection.
    """

    image: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 64
    scale_init: float = 1.0
    bias_init: Optional[float] = None
    shared: bool = False

    def validate(self) -> None:
        self.text.validate()
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}.")
        if not (math.isfinite(self.scale_init) and self.scale_init > 0):
            raise ValueError(f"scale_init must be a finite number > 0 (it is learned as its log), "
                             f"got {self.scale_init}.")
        if self.bias_init is not None and not math.isfinite(self.bias_init):
            raise ValueError(f"bias_init must be finite or None, got {self.bias_init}.")
        if self.shared and self.text.moe is not None:
            raise ValueError("A shared backbone (LIMoE) encodes text with the image tower's blocks: "
                             "leave text.moe unset and configure image.moe.")


def contrastive_presets() -> dict[str, ContrastiveConfig]:
    """Named contrastive models (`create_contrastive_model`): the demo's
    sizes, the image tower a catalogue V-MoE; `contrastive_*` are two-tower,
    `limoe_*` share one MoE backbone with LIMoE's entropy losses."""
    from .catalogue import resolve_config
    image = resolve_config("vmoe_mi4_every2_e8_k2", num_classes=64, image_size=40, patch_size=8,
                           classifier="gap", group_size=800, importance_loss_weight=0.005, load_loss_weight=0.005)
    assert image.moe is not None
    limoe_routing = dataclasses.replace(image.moe.routing, local_entropy_loss_weight=0.005,
                                        global_entropy_loss_weight=0.005)
    text = TextConfig(vocab_size=64, max_len=10, hidden_size=image.hidden_size, num_layers=2, num_heads=4,
                      mlp_dim=256)
    two_tower = ContrastiveConfig(image=image, text=text, embed_dim=64, scale_init=10.0, bias_init=-10.0)
    limoe_image = dataclasses.replace(image, moe=dataclasses.replace(image.moe, routing=limoe_routing))
    return {"contrastive_mi8_every2_e8_k2": two_tower,
            "limoe_mi8_every2_e8_k2": dataclasses.replace(two_tower, image=limoe_image, shared=True)}
