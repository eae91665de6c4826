"""Few-shot linear evaluation on frozen features (the paper's and the
reference's protocol): closed-form L2-regularised least squares with a bias
onto targets in {-1, 1}; the regulariser is chosen from a grid on held-out
training examples; results are mean ± std over seeds."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..data.pipeline import to_model_range


@torch.no_grad()
def extract_features(model, loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) head inputs (`forward_head(..., pre_logits=True)`) and (N,) labels.
    For an E^3 model the members' head inputs are averaged per image."""
    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for images, y in loader:
        tokens = model.forward_features(to_model_range(images.to(device)))
        f = model.forward_head(tokens, pre_logits=True, members=True).double()
        members = model.ensemble_size
        if members > 1:
            f = f.view(-1, members, f.shape[-1]).mean(1)
        feats.append(f.cpu().numpy())
        labels.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(labels)


def ridge_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float) -> np.ndarray:
    """Closed-form least squares with a bias column: W (F+1, classes)."""
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    targets = -np.ones((len(x), num_classes))
    targets[np.arange(len(x)), y] = 1.0
    gram = xb.T @ xb + l2 * np.eye(xb.shape[1])
    return np.linalg.solve(gram, xb.T @ targets)


def ridge_accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return float(((xb @ w).argmax(-1) == y).mean())


def _sample(labels: np.ndarray, per_class: int, rng: np.random.Generator,
            exclude: np.ndarray | None = None) -> np.ndarray:
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if exclude is not None:
            idx = np.setdiff1d(idx, exclude)
        if len(idx) < per_class:
            raise ValueError(f"Class {c} has only {len(idx)} examples for {per_class}-shot sampling.")
        picks.append(rng.choice(idx, per_class, replace=False))
    return np.concatenate(picks)


def fewshot_evaluate(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     shots: Sequence[int] = (1, 5, 10, 25), seeds: int = 3,
                     l2_grid: Sequence[float] = (2.0 ** -10, 1.0, 16.0, 256.0, 1024.0),
                     heldout_per_class: int = 10) -> dict[str, dict[str, Any]]:
    """{"<shots>": {"mean", "std", "l2": [chosen per seed]}} test accuracy.

    For each shot count and seed: sample `shots` training examples per class,
    and `heldout_per_class` other training examples per class; pick the L2
    strength with the best held-out accuracy; refit is not needed (the fit
    is already on the shots); report test accuracy.
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results: dict[str, dict[str, Any]] = {}
    for k in shots:
        accs, chosen = [], []
        for seed in range(seeds):
            rng = np.random.default_rng(seed * 1000 + k)
            idx = _sample(train_y, k, rng)
            held = _sample(train_y, heldout_per_class, rng, exclude=idx)
            fits = {l2: ridge_fit(train_x[idx], train_y[idx], num_classes, l2) for l2 in l2_grid}
            best = max(l2_grid, key=lambda l2: ridge_accuracy(fits[l2], train_x[held], train_y[held]))
            accs.append(ridge_accuracy(fits[best], test_x, test_y))
            chosen.append(best)
        results[str(k)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "l2": chosen}
    return results
