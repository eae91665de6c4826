"""Flax-default initialisers, so freshly built models match the reference's."""
from __future__ import annotations

import math

import torch
from torch import nn


def xavier_uniform_(w: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(w, -bound, bound)


def lecun_normal_(w: torch.Tensor, fan_in: int) -> None:
    """flax `lecun_normal`: truncated normal with variance 1 / fan_in."""
    std = math.sqrt(1.0 / fan_in) / 0.8796256610342398
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
