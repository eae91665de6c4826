"""Registry of Google's released V-MoE checkpoints: name -> reference model
kwargs and the accuracy the reference reports (vmoe/configs/vmoe_paper/*).

Downloading is the user's job; `vmoe convert --preset NAME PREFIX OUT` maps
the files on disk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config.descriptions import BACKBONES, every_n, last_n


@dataclass(frozen=True)
class ReleasedCheckpoint:
    name: str
    description: str          # the paper's model description
    num_classes: int
    image_size: int
    representation: bool      # pre-training keeps the representation layer
    capacity_factor: float
    expected: dict[str, float] = field(default_factory=dict)  # metric -> accuracy (%)
    supported: bool = True
    note: str = ""
    ensemble_size: int = 1    # E^3 members M (VisionTransformerMoeEnsemble when > 1)


def reference_kwargs(desc: str, num_classes: int, image_size: int, representation: bool,
                     capacity_factor: float, ensemble_size: int = 1) -> dict[str, Any]:
    """The reference constructor kwargs of a paper description (the settings
    of vmoe_paper/common.py: token classifier, loss weights 0.005, bfloat16
    dispatch, group size of 8 images; for E^3, eee_paper: 8 images per
    member and group, members interleaved)."""
    head, *opts = [p.strip() for p in desc.split(",")]
    size, patch_text = head.split("-")[-1].split("/")
    opts_d = {o.split("=")[0]: o.split("=")[1] for o in opts if "=" in o}
    where = next(o for o in opts if o.startswith(("Every", "Last")))
    bb, patch = BACKBONES[size], int(patch_text)
    n = int(where.split()[1])
    layers = every_n(bb.num_layers, n) if where.startswith("Every") else last_n(bb.num_layers, n)
    kwargs: dict[str, Any] = {
        "name": "VisionTransformerMoeEnsemble" if ensemble_size > 1 else "VisionTransformerMoe",
        "num_classes": num_classes, "patch_size": [patch, patch], "hidden_size": bb.hidden_size,
        "classifier": "token", "representation_size": bb.hidden_size if representation else None,
        "head_bias_init": -math.log(num_classes),
        "encoder": {
            "num_layers": bb.num_layers, "mlp_dim": bb.mlp_dim, "num_heads": bb.num_heads,
            "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
            "moe": {
                "layers": list(layers), "num_experts": int(opts_d["E"]),
                "group_size": 8 * ((image_size // patch) ** 2 + 1) * ensemble_size,
                "router": {"num_selected_experts": int(opts_d["K"]), "noise_std": 1.0,
                           "importance_loss_weight": 0.005, "load_loss_weight": 0.005,
                           "dispatcher": {"name": "einsum", "bfloat16": True,
                                          "capacity_factor": capacity_factor,
                                          "batch_priority": False}}}},
    }
    if ensemble_size > 1:
        kwargs["encoder"]["moe"]["ensemble_size"] = ensemble_size
    return kwargs


RELEASED: dict[str, ReleasedCheckpoint] = {c.name: c for c in [
    ReleasedCheckpoint("vmoe_s32_last2_ilsvrc2012_randaug_light1", "ViT-S/32, E=8, K=2, Last 2", 1000, 224,
                       True, 1.05, {"ilsvrc2012_test": 73.1, "ilsvrc2012_val_holdout": 76.8,
                                    "real": 74.4, "imagenet_v2": 59.2}),
    ReleasedCheckpoint("vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012", "ViT-S/32, E=8, K=2, Last 2",
                       1000, 384, False, 1.5, {"ilsvrc2012_test": 75.9, "ilsvrc2012_val_holdout": 78.8,
                                               "real": 77.1, "imagenet_v2": 62.0}),
    ReleasedCheckpoint("vmoe_b16_imagenet21k_randaug_strong", "ViT-B/16, E=8, K=2, Every 2", 21843, 224,
                       True, 1.05, {}, note="ImageNet-21k pre-training; evaluate by fine-tuning."),
    ReleasedCheckpoint("vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012", "ViT-B/16, E=8, K=2, Every 2",
                       1000, 384, False, 1.5, {"ilsvrc2012_test": 85.6, "ilsvrc2012_val_holdout": 89.2,
                                               "real": 84.1, "imagenet_v2": 76.1}),
    ReleasedCheckpoint("vmoe_b16_imagenet21k_randaug_strong_ft_cifar10", "ViT-B/16, E=8, K=2, Every 2",
                       10, 128, False, 1.5, {"cifar10_test": 98.7}),
    # E^3 (eee_paper): "EEE-S/32, K=1, M=2, Last 2": 8 experts, 4 per member, K=1.
    ReleasedCheckpoint("eee_s32_last2_ilsvrc2012", "ViT-S/32, E=8, K=1, Last 2", 1000, 224, True, 1.05,
                       {}, ensemble_size=2,
                       note="E^3 efficient ensemble, M=2; logits are (B*2, classes): average them "
                            "with vmoe_torch.models.ensemble_log_probs."),
    ReleasedCheckpoint("eee_s32_last2_ilsvrc2012_ft_cifar100", "ViT-S/32, E=8, K=1, Last 2", 100, 128,
                       True, 1.5, {"cifar100_test": 81.3}, ensemble_size=2,
                       note="E^3, M=2, fine-tuned at 128 px (eee_paper config: 81.31% mean of 3 seeds)."),
]}


def released_config(name: str) -> dict[str, Any]:
    """Reference kwargs of a released checkpoint; raises for unknown or
    not-yet-supported names."""
    if name not in RELEASED:
        raise ValueError(f"Unknown released checkpoint {name!r}; known: {sorted(RELEASED)}.")
    c = RELEASED[name]
    if not c.supported:
        raise ValueError(f"{name!r} is not supported yet: {c.note}")
    return reference_kwargs(c.description, c.num_classes, c.image_size, c.representation,
                            c.capacity_factor, c.ensemble_size)

