"""Routing statistics computed from recorded routing plans (pure functions
of tensors; no plotting here).

A recorded run (see `vmoe_torch.analysis.recording.record_routing`) holds, for G groups of S tokens:
expert_index (G, S, K), buffer_index (G, S, K), gates (G, S, K), capacity.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def flatten_runs(runs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenates recorded runs into token-major tensors:
    expert (T, K), kept (T, K), gates (T, K) for all T tokens in order."""
    expert = torch.cat([r["expert_index"].reshape(-1, r["expert_index"].shape[-1]) for r in runs])
    kept = torch.cat([(r["buffer_index"] < r["capacity"]).reshape(-1, r["buffer_index"].shape[-1])
                      for r in runs])
    gates = torch.cat([r["gates"].reshape(-1, r["gates"].shape[-1]) for r in runs])
    return {"expert": expert, "kept": kept, "gates": gates}


def class_expert_counts(top1_expert: np.ndarray, token_class: np.ndarray, num_classes: int,
                        num_experts: int) -> np.ndarray:
    """(classes, experts) counts of tokens whose top-1 expert is e, by class."""
    counts = np.zeros((num_classes, num_experts), np.int64)
    np.add.at(counts, (token_class, top1_expert), 1)
    return counts


def row_shares(counts: np.ndarray) -> np.ndarray:
    """Each class row normalised to sum to 1 (rows without tokens stay 0)."""
    totals = counts.sum(1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, float), where=totals > 0)


def normalized_mutual_information(counts: np.ndarray) -> float:
    """NMI between class and expert from a contingency table:
    I(C; E) / sqrt(H(C) H(E)), in [0, 1]; 0 when either entropy is 0."""
    p = counts / counts.sum()
    pc, pe = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pc, pe)[nz])).sum())
    hc = -float((pc[pc > 0] * np.log(pc[pc > 0])).sum())
    he = -float((pe[pe > 0] * np.log(pe[pe > 0])).sum())
    if hc <= 0 or he <= 0:
        return 0.0
    return max(0.0, mi / math.sqrt(hc * he))


def expert_load(expert: torch.Tensor, num_experts: int) -> np.ndarray:
    """(E,) fraction of (token, choice) assignments per expert BEFORE the capacity cut."""
    counts = torch.bincount(expert.reshape(-1), minlength=num_experts).double()
    return (counts / counts.sum()).numpy()


def processed_mask(kept: torch.Tensor) -> torch.Tensor:
    """(T,) tokens with at least one kept expert."""
    return kept.any(-1)


def accuracy_by_group_position(correct: np.ndarray, tokens_per_image: int, group_size: int) -> list[float]:
    """Accuracy of images by their position inside their routing group
    (image b's first token sits at b*N; position = (b*N mod S) // N)."""
    b = np.arange(len(correct))
    pos = ((b * tokens_per_image) % group_size) // tokens_per_image
    return [float(correct[pos == p].mean()) for p in range(int(pos.max()) + 1)]
