"""`RoutingControl`: the model's MoE-only methods, mixed into
`VisionTransformerMoe` - reading and changing how every MoE layer routes
(at inference, without retraining), its noise seed, and the layers
themselves. The model class keeps the ViT; this keeps the routing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, cast

from torch import nn

from ..layers.block import Block
from ..moe import MoeMlp
from ..moe.noise import seed_words


class RoutingControl:
    """Needs `self.blocks` (an nn.ModuleList of `Block`)."""

    blocks: nn.ModuleList

    def materialize_noise_seeds(self, device: Any) -> None:
        """The router-noise seed buffers, which no state dict holds, of a
        model built on the meta device."""
        for layer in self.moe_layers().values():
            layer.noise.seed_words = seed_words(0).to(device)

    def moe_layers(self) -> dict[str, MoeMlp]:
        """{"encoderblock_<i>": MoeMlp} for every MoE block."""
        return {f"encoderblock_{i}": cast(MoeMlp, b.mlp) for i, b in enumerate(self._blocks()) if b.is_moe}

    def _blocks(self) -> list[Block]:
        return [cast(Block, b) for b in self.blocks]

    def set_routing(self, layers: Optional[list[int]] = None, **changes: Any) -> None:
        """Changes routing at inference without retraining, e.g.
        `model.set_routing(num_selected_experts=1, capacity_factor=0.5,
        batch_priority=True)`; `layers` restricts it to some block indices.
        All-or-nothing: if any layer rejects the change, none is changed.

        `group_size` (tokens per routing group) is a run-time setting too, one
        for the whole model (no `layers`); Soft MoE accepts a new group size
        only when its slot count, fixed by its parameters, stays the same."""
        moe = self.moe_layers()
        if not moe:
            raise ValueError("This model has no MoE layers to re-route.")
        targets = moe if layers is None else {f"encoderblock_{i}": moe.get(f"encoderblock_{i}") for i in layers}
        missing = [k for k, v in targets.items() if v is None]
        if missing:
            raise ValueError(f"Blocks {missing} are not MoE layers; MoE blocks: {sorted(moe)}.")
        new_group_size = "group_size" in changes
        group_size = changes.pop("group_size", None)
        if new_group_size and layers is not None:
            raise ValueError("group_size is one setting of the whole model: set it without layers=.")
        saved = self.routing_settings()
        try:
            if new_group_size:
                for every in moe.values():
                    every.set_group_size(group_size)
            for layer in targets.values():
                assert layer is not None
                if changes:
                    layer.set_routing(**changes)
        except Exception:
            self._restore_routing(saved)
            raise

    def batch_independent_routing(self) -> dict[str, Any]:
        """The routing changes under which each image's prediction does not
        depend on the other images of its batch (timm's validate.py at any
        -b, serving one request at a time): top-K layers run dropless (no
        capacity, so no token competes with another image's), and expert
        choice / Soft MoE route each image as its own group. Use as
        `with model.routing(**model.batch_independent_routing()): ...`."""
        layers = self.moe_layers()
        if not layers:
            return {}
        if all(layer.routing.router == "top_experts" for layer in layers.values()):
            return {"dropless": True}
        config = self.config  # type: ignore[attr-defined]
        return {"group_size": config.tokens_per_image * config.moe.ensemble_size}

    @property
    def group_size(self) -> Optional[int]:
        """Tokens per routing group (None: each batch is one group), as the
        MoE layers run now."""
        layers = self.moe_layers()
        return next(iter(layers.values())).group_size if layers else None

    def _restore_routing(self, saved: dict[str, Any]) -> None:
        for name, layer in self.moe_layers().items():
            if layer.routing != saved[name]:
                layer.apply_routing(saved[name])
            if layer.group_size != saved["group_size"]:
                layer.set_group_size(saved["group_size"])

    def set_noise_seed(self, seed: Optional[int]) -> None:
        """Router noise from per-group seeds derived from `seed` (None: torch's
        global RNG). Independent of the batch split across processes."""
        for i, layer in enumerate(self.moe_layers().values()):
            layer.noise_seed = None if seed is None else seed * 131 + i

    def routing_settings(self) -> dict[str, Any]:
        """{"encoderblock_<i>": its RoutingConfig, ..., "group_size": tokens per group}."""
        return {**{k: v.routing for k, v in self.moe_layers().items()}, "group_size": self.group_size}

    @contextlib.contextmanager
    def routing(self, layers: Optional[list[int]] = None, **changes: Any) -> Iterator[None]:
        """Context manager form of `set_routing`; restores the settings on exit."""
        saved = self.routing_settings()
        try:
            self.set_routing(layers, **changes)
            yield
        finally:
            self._restore_routing(saved)

