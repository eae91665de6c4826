"""Contrastive image-text models: the reference's two-tower model
(`projects/contrastive/models.py`: an image V-MoE and a text transformer,
each embedding L2-normalised, logits = exp(s) * zimg . ztxt + b) and LIMoE's
multimodal variant (Mustafa et al. 2022: one MoE backbone encodes both
modalities; its routers can add the local and global entropy losses,
`RoutingConfig.local_entropy_loss_weight` / `global_entropy_loss_weight`).

`sigmoid_loss` is the reference trainer's loss (SigLIP). `zero_shot_classifier`
and `zero_shot_accuracy` are the zero-shot evaluation: class embeddings
from caption templates, images assigned to the most similar class.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.contrastive import ContrastiveConfig, TextConfig
from ..layers.block import Block
from .vit_moe import Metrics, VisionTransformerMoe, _block_with_metrics, build_block, collect_block_metrics

CONTRASTIVE_FORMAT = "vmoe-torch-contrastive"


class TextTransformer(nn.Module):
    """(B, L) token ids -> (B, D) pooled features (`TextConfig`); the MoE
    metrics of the forward, the auxiliary loss included, in `self.metrics`."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, config.max_len, config.hidden_size) * 0.02)
        blocks_cfg = config.as_model_config()
        self.blocks = nn.ModuleList([build_block(blocks_cfg, i) for i in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=blocks_cfg.layer_norm_eps)
        self.metrics: Metrics = {}

    def forward(self, tokens: Tensor) -> Tensor:
        x = embed_text(self.embed, self.pos_embed, tokens)
        metrics: Metrics = {}
        aux = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            x, m = _block_with_metrics(cast(Block, block), x, None)
            if m is not None:
                aux = aux + collect_block_metrics(metrics, f"encoderblock_{i}", m)
        metrics["auxiliary_loss"] = aux
        self.metrics = metrics
        return pool_text(self.norm(x), self.config.pool)


def embed_text(embed: nn.Embedding, pos_embed: Tensor, tokens: Tensor) -> Tensor:
    """(B, L) ids -> (B, L, D) token + position embeddings."""
    if tokens.dim() != 2 or tokens.shape[1] > pos_embed.shape[1]:
        raise ValueError(f"Texts must be (B, L) token ids with L <= {pos_embed.shape[1]}, got "
                         f"{tuple(tokens.shape)}.")
    return embed(tokens) + pos_embed[:, : tokens.shape[1]]


def pool_text(x: Tensor, pool: str) -> Tensor:
    if pool == "last":
        return x[:, -1]
    if pool == "first":
        return x[:, 0]
    if pool == "gap":
        return x.mean(1)
    return x.amax(1)


class ContrastiveModel(nn.Module):
    """`model(images, texts)` -> (B_img, B_txt) logits; `model(images=x)` or
    `model(texts=t)` -> the L2-normalised embeddings. The forward's
    auxiliary loss (both towers' MoE layers) is `model.auxiliary_loss`."""

    def __init__(self, config: ContrastiveConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        image_cfg = _with_head(config.image, config.embed_dim)
        self.image = VisionTransformerMoe(image_cfg)
        # The contrastive loop adds `auxiliary_loss` (both towers) itself, as the reference's trainer.
        self.image.set_auxiliary_loss_gradient(attached=False)
        if config.shared:  # LIMoE: the text enters the image tower's blocks
            self.text_embed = nn.Embedding(config.text.vocab_size, image_cfg.hidden_size)
            self.text_pos_embed = nn.Parameter(torch.randn(1, config.text.max_len, image_cfg.hidden_size) * 0.02)
            self.text_head = nn.Linear(image_cfg.hidden_size, config.embed_dim)
        else:
            self.text = TextTransformer(config.text)
            self.text_head = nn.Linear(config.text.hidden_size, config.embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.scale_init)))
        self.bias = None if config.bias_init is None else nn.Parameter(torch.tensor(float(config.bias_init)))
        self.metrics: dict[str, Metrics] = {}

    def encode_images(self, images: Tensor) -> Tensor:
        """An E^3 image tower embeds each member and averages (its classifier
        output would be a log-probability, not an embedding)."""
        z = self.image(images, members=True)
        members = self.image.members_per_image
        if members > 1:
            z = z.view(len(images), members, -1).mean(1)
        self.metrics["img"] = self.image.metrics
        return z / (z.norm(dim=-1, keepdim=True) + 1e-8)

    def encode_texts(self, tokens: Tensor) -> Tensor:
        if self.config.shared:
            x, _ = self.image._run_blocks(embed_text(self.text_embed, self.text_pos_embed, tokens))
            self.metrics["txt"] = self.image.metrics
            z = self.text_head(pool_text(self.image.norm(x), self.config.text.pool))
        else:
            z = self.text_head(self.text(tokens))
            self.metrics["txt"] = self.text.metrics
        return z / (z.norm(dim=-1, keepdim=True) + 1e-8)

    def forward(self, images: Optional[Tensor] = None, texts: Optional[Tensor] = None) -> Tensor:
        if images is None and texts is None:
            raise ValueError("Give images, texts or both.")
        self.metrics = {}
        zimg = None if images is None else self.encode_images(images)
        ztxt = None if texts is None else self.encode_texts(texts)
        if ztxt is None:
            assert zimg is not None
            return zimg
        if zimg is None:
            return ztxt
        logits = zimg @ ztxt.T * self.log_scale.exp()
        return logits if self.bias is None else logits + self.bias

    @property
    def auxiliary_loss(self) -> Tensor:
        """The auxiliary losses of the last forward's MoE layers (both towers)."""
        losses = [m["auxiliary_loss"] for m in self.metrics.values() if "auxiliary_loss" in m]
        return torch.stack(losses).sum() if losses else self.log_scale.new_zeros(())

    def save_pretrained(self, out_dir: str, overwrite: bool = False) -> None:
        """model.safetensors + config.json ({"format": "vmoe-torch-contrastive",
        "model": the ContrastiveConfig}), atomically; NaN / Inf weights refused."""
        import json
        import os

        from safetensors.torch import save_file

        from ..config.typed import to_dict
        from ..utils.io import atomic_directory
        from ..utils.state import refuse_nonfinite
        state = self.state_dict()
        refuse_nonfinite(state, out_dir)
        with atomic_directory(out_dir, overwrite) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                      os.path.join(tmp, "model.safetensors"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"format": CONTRASTIVE_FORMAT, "format_version": 1, "model": to_dict(self.config)}, f,
                          indent=1)

    @classmethod
    def from_pretrained(cls, path: str, map_location: str = "cpu") -> "ContrastiveModel":
        """Loads a `save_pretrained` directory (eval mode), checking the
        format, the config and that the weights fit it exactly."""
        import json
        import os

        from ..config.typed import from_dict
        from ..storage.pretrained import check_pretrained_dir, read_weights
        check_pretrained_dir(path)
        with open(os.path.join(path, "config.json")) as f:
            meta = json.load(f)
        if meta.get("format") != CONTRASTIVE_FORMAT or meta.get("format_version") != 1:
            raise ValueError(f"{path!r} is not a contrastive model directory (format={meta.get('format')!r}); "
                             "image classifiers load with vmoe_torch.from_pretrained.")
        model = cls(from_dict(ContrastiveConfig, meta["model"]))
        model.load_state_dict(read_weights(path, map_location), strict=True)
        return model.eval()


def _with_head(cfg: Any, embed_dim: int) -> Any:
    return dataclasses.replace(cfg, num_classes=embed_dim, head_kernel_zero_init=False, head_bias_init=0.0)


def sigmoid_loss(logits: Tensor) -> Tensor:
    """The reference trainer's loss (SigLIP, arXiv 2303.15343), per image:
    -sum_j log sigmoid(z_ij * logits_ij), z = +1 on the diagonal (the pair)
    and -1 elsewhere. (B, B) -> (B,); the trainer takes the mean."""
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"The last two dims of the logits must be equal, got {tuple(logits.shape)}.")
    z = 2 * torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(logits * z).sum(-1)


@torch.no_grad()
def zero_shot_classifier(model: ContrastiveModel, class_texts: Sequence[Tensor]) -> Tensor:
    """(C, D): per class, the normalised mean of the embeddings of its
    captions (`class_texts[c]`: (T, L) token ids, one row per template)."""
    rows = []
    for tokens in class_texts:
        z = model(texts=tokens).mean(0)
        rows.append(z / z.norm())
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(model: ContrastiveModel, classifier: Tensor, batches: Any) -> float:
    """Top-1 of assigning each image to its most similar class embedding."""
    correct = total = 0
    for images, labels in batches:
        pred = (model(images=images) @ classifier.T).argmax(-1)
        correct += int((pred == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def create_contrastive_model(name: str, **changes: Any) -> ContrastiveModel:
    """A named contrastive model (`config.contrastive.contrastive_presets`);
    `changes` replace top-level ContrastiveConfig fields (e.g. text=...)."""
    from ..config.contrastive import contrastive_presets
    presets = contrastive_presets()
    if name not in presets:
        raise ValueError(f"Unknown contrastive model {name!r}; known: {sorted(presets)}.")
    return ContrastiveModel(dataclasses.replace(presets[name], **changes))
