"""Optimisers (AdamW with decoupled decay on kernels only, SGD+momentum),
learning-rate schedules and global-norm clipping."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config.experiment import OptimConfig, ScheduleConfig
from ..layers.roles import kernel_parameter_names


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters (is everything frozen?).")
    kernels = kernel_parameter_names(model)  # decay by role, never by name or shape
    decay = [p for n, p in params if n in kernels]
    no_decay = [p for n, p in params if n not in kernels]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=1e-8)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"Unknown optimiser {cfg.name!r}: use 'adamw' or 'sgd'.")


def learning_rate(step: int, total_steps: int, peak: float, cfg: ScheduleConfig) -> float:
    """LR used at `step` (0-based): linear warm-up to `peak`, then linear
    decay to `end_lr` or cosine decay to `end_lr` at `total_steps`."""
    if cfg.name == "constant":
        return peak
    warm = cfg.warmup_steps
    if warm and step < warm:
        return peak * (step + 1) / warm
    span = max(1, total_steps - warm)
    frac = min(1.0, (step - warm) / span)
    if cfg.name == "warmup_linear_decay":
        return peak + (cfg.end_lr - peak) * frac
    if cfg.name == "warmup_cosine_decay":
        return cfg.end_lr + 0.5 * (peak - cfg.end_lr) * (1 + math.cos(math.pi * frac))
    raise ValueError(f"Unknown schedule {cfg.name!r}.")


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global-norm clipping; returns the norm before clipping as a 0-dim
    tensor (read it on logged steps only: reading it syncs with the device)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        if not params:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
