"""VisionTransformerMoe: a ViT whose chosen MLP blocks are sparse MoEs
(reference `vmoe.nn.vit_moe.VisionTransformerMoe`).

Data path: images (B, C, H, W) -> conv patches (B, h*w, D) -> [class token]
-> + position embedding -> blocks (pre-LN attention, pre-LN MLP or MoE)
-> encoder LayerNorm -> pool (token / gap / map) -> [Dense + tanh] -> head.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config.model import LayerRouting, ModelConfig
from ..config.typed import from_dict
from ..layers import MapHead, Mlp, PatchEmbed, resample_pos_embed, sincos2d_pos_embed
from ..layers.block import Block
from ..layers.init import lecun_normal_
from ..layers.roles import no_weight_decay_names
from ..moe import MoeMlp
from ..storage import pretrained as files
from ..storage.calibration import Calibration, read_calibration
from ..utils.transient import Transient
from .aux_loss import AuxLossGuard, attach_auxiliary_loss
from .budget import BudgetControl
from .members import ensemble_log_probs, mean_over_members
from .routing_control import RoutingControl
from .timm_contract import POOLS, TimmContract, default_pretrained_cfg

Metrics = dict[str, Tensor]


def _block_with_metrics(block: "Block", x: Tensor, noise: Optional[Tensor]) -> tuple[Tensor, Optional[Metrics]]:
    """A block's output and its MoE metrics, returned together so that
    gradient checkpointing keeps the auxiliary loss in the graph."""
    y = block(x, noise)
    return y, block.metrics if block.is_moe else None


def collect_block_metrics(metrics: Metrics, name: str, block_metrics: Metrics) -> Tensor:
    """Adds one MoE block's metrics to `metrics` under `name/...` (its
    per-group auxiliary loss as `name/auxiliary_loss`) and returns the
    block's auxiliary loss, for the model's total."""
    for key, value in block_metrics.items():
        if key == "auxiliary_loss":
            continue
        out_key = "auxiliary_loss" if key == "auxiliary_loss_per_group" else key
        metrics[f"{name}/{out_key}"] = value
    return block_metrics["auxiliary_loss"]


def check_images(images: Tensor, patch_embed: PatchEmbed, check_finite: bool) -> Tensor:
    """Returns `images` after checking them for a model whose patch embedding
    is `patch_embed` (rank, channels, size, dtype, finiteness), with an error
    that names the fix. FX symbolic tracing records this call as one node
    (`torch.fx.wrap`), so traced models keep the checks."""
    if images.dim() != 4:
        raise ValueError(f"Expected images of shape (B, C, H, W), got {tuple(images.shape)}. "
                         "Add a batch axis, or permute NHWC images with .permute(0, 3, 1, 2).")
    if images.shape[1] != patch_embed.in_chans:
        raise ValueError(f"Expected {patch_embed.in_chans} channels (NCHW), got shape "
                         f"{tuple(images.shape)}. NHWC images need .permute(0, 3, 1, 2).")
    if not images.is_floating_point():
        raise ValueError(f"Images must be floating point in [-1, 1], got {images.dtype}: convert "
                         "them, e.g. images.float() / 127.5 - 1 for uint8 pixels.")
    weight_dtype = patch_embed.proj.weight.dtype
    if images.dtype != weight_dtype and not _autocast_on(images.device.type):
        raise ValueError(f"Images are {images.dtype} but the model is {weight_dtype}: use "
                         f"images.to({weight_dtype}) (or run under torch.autocast).")
    if check_finite:
        if torch.compiler.is_compiling():  # compiled / exported: checked on the device, no sync
            torch._assert_async(torch.isfinite(images).all(), "Input images contain NaN or Inf values.")
        elif not torch.isfinite(images).all():
            raise ValueError("Input images contain NaN or Inf values.")
    patch_embed.grid(images.shape[2], images.shape[3])  # raises on a bad size
    return images


torch.fx.wrap("check_images")


def build_mlp(cfg: ModelConfig, index: int) -> nn.Module:
    """The MLP of block `index`: an MoE layer of the configured kind where
    `cfg.moe` places one, else the dense MLP. A new MoE kind is added here;
    the block receives whatever this returns."""
    moe = cfg.moe
    if moe is not None and index in moe.layers:
        return MoeMlp(cfg.hidden_size, moe.mlp_dim or cfg.mlp_dim, moe.num_experts, moe.routing_for(index),
                      group_size=moe.group_size, ensemble_size=moe.ensemble_size, gelu=cfg.gelu,
                      dropout_rate=cfg.dropout_rate if moe.dropout_rate is None else moe.dropout_rate)
    return Mlp(cfg.hidden_size, cfg.mlp_dim, cfg.dropout_rate, cfg.gelu)


def build_block(cfg: ModelConfig, index: int) -> Block:
    """Block `index` of `cfg`, its stochastic depth rising linearly with depth."""
    return Block(cfg.hidden_size, cfg.num_heads, functools.partial(build_mlp, cfg, index),
                 drop_path_rate=cfg.drop_path_rate * index / max(cfg.num_layers - 1, 1),
                 dropout_rate=cfg.dropout_rate, attention_dropout_rate=cfg.attention_dropout_rate,
                 eps=cfg.layer_norm_eps, qk_norm=cfg.qk_norm)


class VisionTransformerMoe(RoutingControl, BudgetControl, TimmContract, nn.Module):
    """Vision Transformer with sparse MoE layers (arXiv 2106.05974).

    `model(images)` takes (B, C, H, W) float images and returns logits
    (B, num_classes). Each forward leaves its MoE metrics in `model.metrics`:
    `metrics["auxiliary_loss"]` (also `model.auxiliary_loss`) is the 0-dim
    tensor to add to the training loss and `encoderblock_<i>/<name>` holds
    each MoE layer's per-group (G,) metrics; `model(images,
    return_metrics=True)` returns `(logits, metrics)` as a convenience.
    `forward_features`, `forward_head` and every block return tensors.

    E^3 (`config.moe.ensemble_size` M > 1): the tokens are repeated M times
    just before the first MoE block (row b*M + m is image b for member m)
    and the model returns (B*M, classes) logits, as the reference; average
    the members with `ensemble_log_probs(logits, M)`.

    `model.config` is derived from the layers: the routing each MoE layer
    actually runs is what `config` reports and what is saved.
    """

    def __init__(self, config: Optional[ModelConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = from_dict(ModelConfig, kwargs)
        elif kwargs:
            raise ValueError("Pass either a ModelConfig or keyword arguments, not both.")
        config.validate()
        self._config = config
        # The MoE metrics of the last forward (a declared channel: forward
        # returns tensors only unless return_metrics=True).
        self._last: Transient[Metrics] = Transient(dict)  # not copied nor pickled (graph tensors)
        self.grad_checkpointing = False
        self._range_checked = False  # `_check_range_once`
        self.calibration: Optional[Calibration] = None  # measured accuracy-compute curve (`at_budget`)
        self._aux_guard = AuxLossGuard()
        self._aux_gradient_scale: Optional[float] = 1.0  # `set_auxiliary_loss_gradient`
        self._warned_fp16 = False
        self.pretrained_cfg = default_pretrained_cfg(config)
        d = config.hidden_size
        self.patch_embed = PatchEmbed(config.patch_size, d, config.in_chans)
        self.num_prefix_tokens = 1 if config.classifier == "token" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if self.num_prefix_tokens else None
        self.pos_grid = config.grid
        if config.position_emb == "learned":
            n = self.pos_grid[0] * self.pos_grid[1] + self.num_prefix_tokens
            self.pos_embed = nn.Parameter(torch.empty(1, n, d).normal_(std=0.02))
        else:
            self.pos_embed = None  # type: ignore[assignment]
        self.pos_drop = nn.Dropout(config.dropout_rate)
        self.ensemble_size = config.moe.ensemble_size if config.moe is not None else 1
        moe_layers = sorted(config.moe.layers) if config.moe is not None else []
        self.first_moe_block = moe_layers[0] if moe_layers else -1
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.map_head = MapHead(d, config.mlp_dim, config.num_heads) if config.classifier == "map" else None
        if config.representation_size:
            self.pre_logits: Optional[nn.Linear] = nn.Linear(d, config.representation_size)
            lecun_normal_(self.pre_logits.weight, d)
            nn.init.zeros_(self.pre_logits.bias)
        else:
            self.pre_logits = None
        self.num_features = config.representation_size or d
        self.head: Optional[nn.Linear] = None
        self._build_head(config.num_classes, config.head_bias_init)

    # --------------------------------------------------------------- config
    @property
    def config(self) -> ModelConfig:
        """The model's configuration, with each MoE layer's routing as it runs
        now: the most common setting in `moe.routing`, the others in
        `moe.layer_routing`."""
        cfg = self._config
        if cfg.moe is None:
            return cfg
        per = {int(name.split("_")[-1]): layer.routing for name, layer in self.moe_layers().items()}
        if not per:
            return cfg
        moe = dataclasses.replace(cfg.moe, group_size=self.group_size)
        values = list(per.values())
        base = max(values, key=lambda r: (values.count(r), r == moe.routing))
        overrides = tuple(LayerRouting(i, r) for i, r in sorted(per.items()) if r != base)
        return dataclasses.replace(cfg, moe=dataclasses.replace(moe, routing=base, layer_routing=overrides))

    @config.setter
    def config(self, value: ModelConfig) -> None:
        self._config = value

    @property
    def metrics(self) -> Metrics:
        """The MoE metrics of the last forward (empty before one, and in a
        copy: `copy.deepcopy` and pickling do not carry graph tensors)."""
        return self._last.value

    @metrics.setter
    def metrics(self, value: Metrics) -> None:
        self._last.value = value

    # ----------------------------------------------------------------- head
    def _build_head(self, num_classes: int, bias_init: float, like: Optional[Tensor] = None) -> None:
        """A new head; on the device and in the dtype of `like` when given."""
        if num_classes <= 0:
            self.head = None
            return
        self.head = nn.Linear(self.num_features, num_classes, device=None if like is None else like.device,
                              dtype=None if like is None else like.dtype)
        if self._config.head_kernel_zero_init:
            nn.init.zeros_(self.head.weight)
        else:
            lecun_normal_(self.head.weight, self.num_features)
        nn.init.constant_(self.head.bias, bias_init)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, *,
                         head_bias_init: float = 0.0, keep_representation: bool = True) -> None:
        """New zero-initialised head with `num_classes` outputs (0: none), as
        timm's `reset_classifier(num_classes, global_pool=None)`.

        `global_pool` (None, or the model's own pooling: "token", "avg" /
        "gap", "map") is accepted for timm's signature; the pooling itself is
        fixed by the parameters (class token, MAP head). `keep_representation=False` drops the
        representation (pre-logits) layer."""
        if global_pool is not None:
            self._set_pool(global_pool)
        if not keep_representation and self.pre_logits is not None:
            self.pre_logits = None
            self.num_features = self._config.hidden_size
        self._config = dataclasses.replace(
            self._config, num_classes=num_classes, head_bias_init=head_bias_init,
            representation_size=self._config.representation_size if self.pre_logits is not None else None)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        self._build_head(num_classes, head_bias_init, like=self.patch_embed.proj.weight)
        if self.head is not None:
            self.head.train(self.training)

    def _set_pool(self, global_pool: str) -> None:
        kind = POOLS.get(global_pool)
        if kind is None:
            raise ValueError(f"global_pool={global_pool!r} is not supported: use one of "
                             f"{sorted(POOLS)}, or None to keep the current pooling.")
        if kind != self._config.classifier:
            raise ValueError(f"This model pools with {self._config.classifier!r}; its parameters (class "
                             "token, MAP head) fix the pooling. Build the model with the pooling you "
                             f"need (create_model(..., global_pool={global_pool!r})).")

    # ------------------------------------------------------- position embed
    def resize_pos_embed(self, image_size: tuple[int, int]) -> None:
        """Resamples the learned position embedding for another image size
        (fine-tuning at a higher resolution), class token kept."""
        new_grid = self.patch_embed.grid(*image_size)
        if self.pos_embed is not None:
            new = resample_pos_embed(self.pos_embed.data, self.pos_grid, new_grid, self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)
        self.pos_grid = new_grid
        self._config = dataclasses.replace(self._config, image_size=(int(image_size[0]), int(image_size[1])))

    def _check_range_once(self, images: Tensor) -> None:
        """Warns, on the model's first eager forward only (one host read),
        when inputs are far outside [-1, 1]: 0..255 pixels, say."""
        if self._range_checked or torch.compiler.is_compiling() or images.device.type == "meta":
            return
        self._range_checked = True
        peak = float(images.detach().abs().amax()) if images.numel() else 0.0
        if peak > 10:
            warnings.warn(f"Input images reach |x| = {peak:g}; the model expects pixels scaled to [-1, 1] "
                          "(x / 127.5 - 1 for 0..255 values, or the model's pretrained_cfg mean/std).")

    def _add_pos_embed(self, x: Tensor, grid: tuple[int, int], interpolate: bool) -> Tensor:
        kind = self._config.position_emb
        if kind == "sincos2d":
            pe = sincos2d_pos_embed(grid[0], grid[1], x.shape[-1], device=x.device).to(x.dtype)
            if self.num_prefix_tokens:
                return torch.cat([x[:, :1], x[:, 1:] + pe], dim=1)
            return x + pe
        if kind == "learned":
            pe = self.pos_embed
            if grid != self.pos_grid:
                if not interpolate:
                    raise ValueError(
                        f"Images give a {grid[0]}x{grid[1]} patch grid but the position embedding "
                        f"is for {self.pos_grid[0]}x{self.pos_grid[1]} (image_size="
                        f"{self._config.image_size}). Pass interpolate_pos_embed=True, or call "
                        "model.resize_pos_embed(new_image_size) once before fine-tuning.")
                pe = resample_pos_embed(pe, self.pos_grid, grid, self.num_prefix_tokens)
            return x + pe.to(x.dtype)
        return x

    # -------------------------------------------------------------- forward
    def _embed(self, images: Tensor, interpolate_pos_embed: bool) -> Tensor:
        """(B, C, H, W) -> tokens (B, N, D) with the position embedding."""
        images = check_images(images, self.patch_embed, self._config.check_finite)
        if isinstance(images, torch.fx.Proxy):  # FX tracing: the configured size
            grid = self.pos_grid
        else:
            grid = self.patch_embed.grid(images.shape[2], images.shape[3])
            self._check_range_once(images)
        x = self.patch_embed(images)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        interpolate = interpolate_pos_embed or self._config.dynamic_img_size
        return self.pos_drop(self._add_pos_embed(x, grid, interpolate))

    def _run_blocks(self, x: Tensor, router_noise: Optional[Mapping[str, Tensor]] = None,
                    take: Sequence[int] = (), last: Optional[int] = None) -> tuple[Tensor, list[Tensor]]:
        """Runs blocks 0..`last` (all by default) and returns (tokens, the
        outputs of the blocks in `take`); leaves the MoE metrics, the
        auxiliary loss included, in `self.metrics`."""
        metrics: Metrics = {}
        taken: list[Tensor] = []
        aux = x.new_zeros((), dtype=torch.float32)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self._blocks()):
            if last is not None and i > last:
                break
            if i == self.first_moe_block and self.ensemble_size > 1:
                x = x.repeat_interleave(self.ensemble_size, dim=0)
            name = f"encoderblock_{i}"
            noise = router_noise.get(name) if router_noise else None
            if checkpointing:
                x, m = checkpoint(_block_with_metrics, block, x, noise, use_reentrant=False)
            else:
                x, m = _block_with_metrics(block, x, noise)
            if m is not None and not isinstance(x, torch.fx.Proxy):  # FX graphs carry no metrics
                aux = aux + collect_block_metrics(metrics, name, m)
            if i in take:
                taken.append(x)
        metrics["auxiliary_loss"] = aux
        self.metrics = metrics
        return x, taken

    def forward_features(self, images: Tensor, router_noise: Optional[Mapping[str, Tensor]] = None,
                         interpolate_pos_embed: bool = False) -> Tensor:
        """(B, C, H, W) -> encoded tokens (B, N, D) after the encoder norm (before
        it with `norm_after_pool`). The MoE metrics of this forward, the
        auxiliary loss included, are left in `self.metrics`."""
        x, _ = self._run_blocks(self._embed(images, interpolate_pos_embed), router_noise)
        if self._config.norm_after_pool:
            return x  # the norm is applied to the pooled vector (`pool`)
        return self.norm(x)

    def pool(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, D) by the configured classifier."""
        if self._config.classifier == "token":
            return x[:, 0]
        if self._config.classifier == "gap":
            pooled = x.mean(dim=1)
            return self.norm(pooled) if self._config.norm_after_pool else pooled
        assert self.map_head is not None
        return self.map_head(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False, members: bool = False) -> Tensor:
        """Encoded tokens (B, N, D) -> logits (B, classes), or with
        `pre_logits=True` the head's input (after the tanh of the
        representation layer), the features few-shot evaluation uses.

        E^3 (M members, tokens (B*M, N, D)): one row per image, the log of
        the members' mean probability (a valid logit vector) or the members'
        mean features; `members=True` keeps the (B*M, ...) member rows."""
        x = self.pool(x)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        out = x if pre_logits or self.head is None else self.head(x)
        m = self.members_per_image
        if m == 1 or members:
            return out
        return mean_over_members(out, m) if out is x else ensemble_log_probs(out, m).to(out.dtype)

    @property
    def members_per_image(self) -> int:
        """Rows per image after the blocks: M for an E^3 model (its first MoE
        block repeats the tokens), else 1."""
        return self.ensemble_size if 0 <= self.first_moe_block < len(self.blocks) else 1

    def forward(self, images: Tensor, return_metrics: bool = False,
                router_noise: Optional[Mapping[str, Tensor]] = None,
                interpolate_pos_embed: bool = False, members: bool = False):
        """Logits (B, classes); with `return_metrics=True`, `(logits, metrics)`.
        Either way the metrics of this forward stay in `self.metrics` and the
        auxiliary loss in `self.auxiliary_loss`.

        Training: the logits carry the auxiliary loss's gradient (see
        `set_auxiliary_loss_gradient`), so a loop that only backpropagates
        its task loss still trains the routers with it, and one that adds
        `model.auxiliary_loss` itself counts it once.

        E^3: one row per image, the members' mean probability as log-probs
        (timm's contract; training through it fits the ensemble's mixture).
        `members=True` returns the reference's (B*M, classes) member logits
        (row b*M + m), which the reference trains with one loss per member.

        FX symbolic tracing traces `forward_head(forward_features(images))`:
        the options keep their defaults and the graph returns logits only."""
        if isinstance(images, torch.fx.Proxy):
            return self.forward_head(self.forward_features(images))
        tokens = self.forward_features(images, router_noise, interpolate_pos_embed)
        logits = self.forward_head(tokens, members=members)
        if self.training and torch.is_grad_enabled():
            logits = self._carry_auxiliary_loss(logits, watch=not return_metrics)
        return (logits, self.metrics) if return_metrics else logits

    def _carry_auxiliary_loss(self, logits: Tensor, watch: bool) -> Tensor:
        aux = self.metrics["auxiliary_loss"]
        if self._aux_gradient_scale is None:
            if watch:  # generic loops: notice a dropped auxiliary loss
                self._aux_guard.watch(logits, aux)
            return logits
        if not (aux.requires_grad and logits.requires_grad):
            return logits
        if logits.dtype == torch.float16 and not self._warned_fp16 and not torch.compiler.is_compiling():
            self._warned_fp16 = True
            warnings.warn(
                "float16 logits in training: a loop that scales its loss (a GradScaler, as timm's train.py "
                "does for --amp-dtype float16) does not scale the auxiliary-loss gradient the logits carry, "
                "so the router's load-balancing gradient shrinks by the loss scale. Train in bfloat16 "
                "(no loss scaling), or add `model.auxiliary_loss` to the loss before scaling "
                "(vmoe_torch.WithAuxiliaryLoss); a loss that already adds it needs nothing.", stacklevel=3)
        logits, self.metrics["auxiliary_loss"] = attach_auxiliary_loss(logits, aux, self._aux_gradient_scale)
        return logits

    def set_auxiliary_loss_gradient(self, attached: bool = True, scale: float = 1.0) -> None:
        """Whether a training forward's logits carry the auxiliary loss's
        gradient (default: yes, `scale` 1).

        With it on, a backward pass through the logits gives the auxiliary
        loss the gradient `scale`: the loop's gradient is that of
        `task_loss + scale * model.auxiliary_loss`, exactly once, also when
        the logits feed several losses. A loop that adds
        `model.auxiliary_loss` to its loss (any weight) gets that explicit
        gradient instead, never both. A loop that divides its loss by N
        (gradient accumulation) or multiplies it by a fixed factor and does
        not add the auxiliary loss itself should pass that factor as
        `scale` (timm: the `auxiliary_loss_gradient_scale` keyword). A
        dynamic fp16 loss scale (GradScaler) cannot be followed: add the
        auxiliary loss before scaling, or train in bfloat16; float16 logits
        warn once. `attached=False` restores plain logits (and a warning
        when the auxiliary loss gets no gradient)."""
        if attached and not (0 < scale < float("inf")):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}.")
        self._aux_gradient_scale = float(scale) if attached else None

    @property
    def auxiliary_loss(self) -> Tensor:
        """0-dim tensor: the last forward's weighted auxiliary loss, summed over
        MoE layers (zero for dense models and Soft MoE). Add it to the loss."""
        if "auxiliary_loss" not in self.metrics:
            raise RuntimeError("No forward has run yet: call the model first.")
        return self.metrics["auxiliary_loss"]

    # ----------------------------------------------------------- save / load
    def save_pretrained(self, out_dir: str, overwrite: bool = False,
                        source: Optional[dict[str, Any]] = None, allow_nonfinite: bool = False) -> None:
        """Writes a Hub-compatible directory: model.safetensors (with the
        architecture fingerprint), config.json and a model card README.md
        (`vmoe_torch.storage.pretrained`), with the calibration when there is
        one, atomically; NaN / Inf weights are refused unless `allow_nonfinite`."""
        files.write_pretrained(self.state_dict(), self.config, out_dir, overwrite, source, allow_nonfinite,
                               calibration=self.calibration)

    @classmethod
    def from_pretrained(cls, path: str, map_location: str = "cpu", **routing: Any) -> "VisionTransformerMoe":
        """Loads a `save_pretrained` / `vmoe convert` directory (eval mode);
        routing keyword arguments are applied with `set_routing`."""
        files.check_pretrained_dir(path)
        with torch.device("meta"):  # no throw-away initialisation: the weights are assigned
            model = cls(files.read_config(path))
        state = files.read_weights(path, map_location)
        files.check_state(model, state)
        files.check_fingerprint(path, model.config)
        model.load_state_dict(state, strict=True, assign=True)
        model.materialize_noise_seeds(map_location)
        model.calibration = read_calibration(path)
        model.eval()
        if routing:
            model.set_routing(**routing)
        return model

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters not to weight-decay: all but the kernels
        (`vmoe_torch.layers.roles`); timm's optimizer factory reads this."""
        return no_weight_decay_names(self)


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())
