"""The input normalisation a dense source was trained with.

Every library's ViT takes `(x01 - mean) / std` of images in [0, 1]; this
library's models take [-1, 1] (mean = std = 0.5), and `readers.
fold_input_normalization` folds the difference into the patch embedding.
Getting it wrong is silent (a DeiT read as mean 0.5 is off by as much as its
logits' scale), so it is resolved in this order and never guessed:

1. given by the caller (`mean=` / `std=`, or a preset name, CLI `--mean`,
   `--std`, `--normalization`);
2. recorded by the source: a live timm model's `pretrained_cfg`, the
   `pretrained_cfg` of a timm `save_for_hf` / hub directory's config.json, a
   Hugging Face `preprocessor_config.json`, the `--mean/--std` a timm
   training checkpoint recorded;
3. fixed by the format: torchvision's ViT weights (ImageNet statistics),
   vit_jax / big_vision .npz files ([-1, 1]);
4. otherwise the read is refused, naming the source and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from .files import SourceError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),   # DeiT, torchvision, many timm models
    "inception": (HALF, HALF),                   # the original ViT / vit_jax, google/vit-* on the Hub
    "clip": (CLIP_MEAN, CLIP_STD),               # OpenAI CLIP image towers
}
Values = Union[str, Sequence[float], None]


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of images in [0, 1], and where they came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise SourceError(f"mean {self.mean} and std {self.std} ({self.origin}) must have one "
                              "value per input channel each.")
        if any(not s > 0 for s in self.std):
            raise SourceError(f"std {self.std} ({self.origin}) must be positive.")

    def describe(self) -> str:
        return f"input mean {self.mean} / std {self.std} ({self.origin})"


def _floats(values: Sequence[Any], what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise SourceError(f"{what} {values!r} is not a list of numbers.") from e


def given(mean: Values = None, std: Values = None, preset: Optional[str] = None) -> Optional[Normalization]:
    """What the caller gave: a preset name (`preset`, or `mean` given as a
    name), or both `mean` and `std`; None when nothing was given."""
    if isinstance(mean, str) and std is None and preset is None:
        preset, mean = mean, None
    if preset is not None:
        if mean is not None or std is not None:
            raise SourceError("Give a normalisation preset or mean/std, not both.")
        if preset not in PRESETS:
            raise SourceError(f"Unknown normalisation preset {preset!r}; known: {sorted(PRESETS)}.")
        m, s = PRESETS[preset]
        return Normalization(m, s, f"given: {preset}")
    if mean is None and std is None:
        return None
    if mean is None or std is None or isinstance(mean, str) or isinstance(std, str):
        raise SourceError("Give both mean and std (three numbers each), or a preset "
                          f"({', '.join(sorted(PRESETS))}).")
    return Normalization(_floats(mean, "mean"), _floats(std, "std"), "given")


def from_timm_cfg(cfg: Optional[Mapping[str, Any]], origin: str) -> Optional[Normalization]:
    """From a timm `pretrained_cfg` (a live model's, or the one a timm
    config.json records under "pretrained_cfg")."""
    if not cfg:
        return None
    nested = cfg.get("pretrained_cfg")
    inner: Mapping[str, Any] = nested if isinstance(nested, Mapping) else cfg
    if inner.get("mean") is None or inner.get("std") is None:
        return None
    return Normalization(_floats(inner["mean"], "mean"), _floats(inner["std"], "std"), origin)


def from_hf_preprocessor(pre: Optional[Mapping[str, Any]], origin: str) -> Optional[Normalization]:
    """From a Hugging Face preprocessor_config.json (`image_mean` / `image_std`)."""
    if not pre or pre.get("image_mean") is None or pre.get("image_std") is None:
        return None
    if pre.get("do_rescale") is False:
        raise SourceError(f"{origin}: do_rescale is false (the model takes 0..255 pixel values); "
                          "pass the normalisation explicitly (mean=/std= of images in [0, 1]).")
    if pre.get("do_normalize") is False:  # the model takes the rescaled [0, 1] image itself
        return Normalization((0.0,) * len(pre["image_mean"]), (1.0,) * len(pre["image_std"]),
                             f"{origin} (do_normalize false)")
    return Normalization(_floats(pre["image_mean"], "image_mean"), _floats(pre["image_std"], "image_std"),
                         origin)


def unknown(where: str, hint: str = "") -> SourceError:
    """The refusal when nothing records the normalisation."""
    return SourceError(
        f"{where}: the input normalisation this model was trained with is not recorded anywhere the "
        f"reader looks{hint}, and a wrong guess is silently wrong (a DeiT read as mean 0.5 is off by "
        "as much as its logits). Say it: normalization='imagenet' (DeiT, torchvision, most timm "
        "models), 'inception' (mean = std = 0.5: the original ViT, google/vit-*), 'clip', or "
        "mean=(r, g, b), std=(r, g, b); on the command line --normalization NAME or --mean R,G,B "
        "--std R,G,B.")


def resolve(*candidates: Optional[Normalization], where: str, hint: str = "") -> Normalization:
    """The first candidate that is not None (callers list them by priority)."""
    for c in candidates:
        if c is not None:
            return c
    raise unknown(where, hint)
