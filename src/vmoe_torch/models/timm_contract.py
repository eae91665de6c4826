"""The timm model interface of `VisionTransformerMoe` (no timm import).

timm's tools (its optimizer factory with layer decay, data-config
resolution, feature extraction wrappers, gradient checkpointing switches)
talk to models through a small set of methods and attributes. This mixin
provides them on top of the model's own `_embed` / `_run_blocks` /
`forward_head`; `vmoe_torch.integrations.timm` registers the models.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, Union

from torch import Tensor, nn

from ..config.model import ModelConfig, as_pair
from .members import mean_over_members

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

# timm's pooling names -> ModelConfig.classifier.
POOLS = {"token": "token", "avg": "gap", "gap": "gap", "map": "map"}

# Our models take images in [-1, 1]: timm's [0, 1] tensors normalised with 0.5 / 0.5.
MEAN = STD = (0.5, 0.5, 0.5)


def default_pretrained_cfg(config: ModelConfig) -> dict[str, Any]:
    """timm's pretrained_cfg for a model of `config` (input size, the [-1, 1]
    normalisation, where the first conv and the classifier are)."""
    return {
        "num_classes": config.num_classes,
        "input_size": (config.in_chans, *config.image_size),
        "fixed_input_size": not config.dynamic_img_size,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": MEAN,
        "std": STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
    }


def take_indices(num_blocks: int, indices: Optional[Union[int, Sequence[int]]]) -> tuple[list[int], int]:
    """timm's rule: an int n takes the last n blocks, None all of them, a
    sequence those indices (negative ones count from the end). Returns
    (sorted indices, the largest)."""
    if indices is None:
        chosen = list(range(num_blocks))
    elif isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices} must be in 1..{num_blocks} (the last n blocks).")
        chosen = list(range(num_blocks - indices, num_blocks))
    else:
        chosen = [i + num_blocks if i < 0 else i for i in indices]
        bad = [i for i in chosen if not 0 <= i < num_blocks]
        if bad:
            raise ValueError(f"Block indices {list(indices)} outside 0..{num_blocks - 1}.")
    chosen = sorted(set(chosen))
    return chosen, chosen[-1]


class TimmContract:
    """Mixin: the timm model contract (see module docstring)."""

    if TYPE_CHECKING:
        _config: ModelConfig
        first_moe_block: int
        blocks: nn.ModuleList
        norm: nn.Module
        head: Optional[nn.Linear]
        num_features: int
        num_prefix_tokens: int
        grad_checkpointing: bool
        patch_embed: Any

        @property
        def members_per_image(self) -> int: ...

        def _embed(self, images: Tensor, interpolate_pos_embed: bool) -> Tensor: ...
        def _run_blocks(self, x: Tensor, router_noise: Optional[Mapping[str, Tensor]] = None,
                        take: Sequence[int] = (), last: Optional[int] = None
                        ) -> tuple[Tensor, list[Tensor]]: ...
        def resize_pos_embed(self, image_size: tuple[int, int]) -> None: ...

    pretrained_cfg: dict[str, Any]

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: dict[str, Any]) -> None:
        self.pretrained_cfg = value

    @property
    def num_classes(self) -> int:
        return self._config.num_classes

    @property
    def head_hidden_size(self) -> int:
        """Size of the head's input (pre-logits features)."""
        return self.num_features

    @property
    def embed_dim(self) -> int:
        return self._config.hidden_size

    @property
    def in_chans(self) -> int:
        """Input channels (timm's attribute)."""
        return self._config.in_chans

    @property
    def global_pool(self) -> str:
        return {"gap": "avg"}.get(self._config.classifier, self._config.classifier)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per block: its module name, channels and stride."""
        d, stride = self._config.hidden_size, self._config.patch_size[0]
        return [{"module": f"blocks.{i}", "num_chs": d, "reduction": stride} for i in range(len(self.blocks))]

    def get_classifier(self) -> nn.Module:
        return self.head if self.head is not None else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:  # noqa: ARG002 - timm's signature
        """Parameter groups for layer-wise learning-rate decay (timm)."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its
        activations (gradients are unchanged; the MoE metrics and auxiliary
        loss stay in the graph)."""
        self.grad_checkpointing = bool(enable)

    def set_input_size(self, img_size: Optional[Union[int, tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, tuple[int, int]]] = None) -> None:
        """timm's `set_input_size`: resamples the learned position embedding
        for `img_size`. The patch size is fixed by the patch-embedding kernel."""
        if patch_size is not None and as_pair(patch_size) != tuple(self._config.patch_size):
            raise ValueError("Changing the patch size is not supported (the patch embedding's kernel "
                             "is fixed); build a new model, or fine-tune one of that patch size.")
        if img_size is not None:
            size = as_pair(img_size)
            grid = self._config.patch_size
            if size[0] % grid[0] or size[1] % grid[1]:
                raise ValueError(f"img_size {size} is not a multiple of the patch size {grid}.")
            self.resize_pos_embed(size)
            self.pretrained_cfg = {**self.pretrained_cfg, "input_size": (self._config.in_chans, *size)}

    def forward_intermediates(
            self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
            return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
            output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[list[Any], tuple[Tensor, list[Any]]]:
        """timm's feature API: the outputs of the chosen blocks (NCHW maps of
        the patch tokens, or NLC), and unless `intermediates_only` the final
        tokens as `forward_features` returns them. E^3 intermediates are (B, ...)
        at every depth: after the first MoE block, the members' mean (the
        final tokens stay (B*M, N, D), as `forward_head` takes them)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        chosen, last = take_indices(len(self.blocks), indices)
        height, width = x.shape[-2:]
        tokens, taken = self._run_blocks(self._embed(x, False), take=chosen,
                                         last=last if stop_early or intermediates_only else None)
        if norm:
            taken = [self.norm(t) for t in taken]
        m = self.members_per_image
        taken = [mean_over_members(t, m) if m > 1 and i >= self.first_moe_block else t
                 for i, t in zip(chosen, taken)]
        p = self.num_prefix_tokens
        prefix = [t[:, :p] for t in taken]
        spatial = [t[:, p:] for t in taken]
        if output_fmt == "NCHW":
            h, w = height // self._config.patch_size[0], width // self._config.patch_size[1]
            spatial = [t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for t in spatial]
        out: list[Any] = list(zip(spatial, prefix)) if return_prefix_tokens and p else spatial
        if intermediates_only:
            return out
        final = tokens if self._config.norm_after_pool else self.norm(tokens)
        return final, out

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops the blocks after the last of `indices` (and the final norm /
        head if asked), for feature extraction; returns the kept indices."""
        chosen, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        moe = self._config.moe
        if moe is not None:
            moe = dataclasses.replace(moe, layers=tuple(i for i in moe.layers if i <= last),
                                      layer_routing=tuple(e for e in moe.layer_routing if e.layer <= last))
            moe = moe if moe.layers else None
        self._config = dataclasses.replace(self._config, num_layers=last + 1, moe=moe)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)  # type: ignore[attr-defined]
        return chosen
