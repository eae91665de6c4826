"""matplotlib figures of the routing analysis (Agg backend, PNG files)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> None:
    if not fig.get_constrained_layout():
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capacity_sweep(rows: Sequence[dict[str, Any]], path: str, title: str = "",
                        soft: Optional[dict[str, Any]] = None) -> None:
    """Accuracy and processed-token fraction against the capacity factor;
    `soft` adds a Soft MoE model at its matched-compute capacity factor."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(r["num_selected_experts"], r["batch_priority"]) for r in rows}, reverse=True)
    for k, bpr in keys:
        sel = sorted((r for r in rows if r["num_selected_experts"] == k and r["batch_priority"] == bpr),
                     key=lambda r: r["capacity_factor"])
        cf = [r["capacity_factor"] for r in sel]
        style = dict(marker="o" if bpr else "s", linestyle="-" if bpr else "--",
                     label=f"K={k}, {'BPR' if bpr else 'vanilla'}")
        ax1.plot(cf, [r["test_accuracy"] for r in sel], **style)
        ax2.plot(cf, [r["processed_fraction"] for r in sel], **style)
    if soft is not None:
        label = f"Soft MoE ({soft['slots_per_expert']} slots/expert)"
        # zorder above the legend, which may sit where the point falls
        ax1.plot([soft["equivalent_capacity_factor"]], [soft["test_accuracy"]], marker="*",
                 markersize=14, linestyle="none", color="black", label=label, zorder=10)
        ax2.plot([soft["equivalent_capacity_factor"]], [1.0], marker="*", markersize=14,
                 linestyle="none", color="black", label=label, zorder=10)
    for ax, ylabel in ((ax1, "test accuracy (fraction)"),
                       (ax2, "tokens processed by >= 1 expert (fraction)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("capacity factor C (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_title(title or "Accuracy vs capacity: BPR vs vanilla")
    ax2.set_title("Processed tokens vs capacity (mean over MoE layers)")
    _save(fig, path)


def plot_heatmaps(shares: dict[str, np.ndarray], nmi: dict[str, float], path: str) -> None:
    """One (class x expert) heatmap per MoE layer; rows sum to 1."""
    n = len(shares)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (layer, share) in zip(axes.flat, shares.items()):
        im = ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{layer}  (NMI {nmi[layer]:.3f})", fontsize=9)
        ax.set_xlabel("expert (top-1 choice)")
        ax.set_ylabel("class")
        ax.set_xticks(range(share.shape[1]))
        ax.set_yticks(range(share.shape[0]))
        fig.colorbar(im, ax=ax, label="share of the class's tokens")
    _save(fig, path)


_TOKEN_KINDS = (("vanilla: kept", "vanilla", "Greens"), ("BPR: kept", "bpr", "Greens"),
                ("BPR priority", "priority", "magma"), ("top-1 expert", "expert", "tab10"))


def plot_token_maps(images: np.ndarray, maps: dict[str, dict[str, np.ndarray]], path: str,
                    capacity_factor: float) -> None:
    """One block per image: rows are the panel kinds (patches processed
    under vanilla routing and under BPR, the BPR priority, the top-1
    expert), columns the MoE layers; a legend names the colours."""
    from matplotlib import cm, colors
    from matplotlib.patches import Patch
    layers = list(maps)
    n_img, kinds = images.shape[0], len(_TOKEN_KINDS)
    experts = int(max(maps[n]["expert"].max() for n in layers)) + 1
    rows, cols = n_img * kinds, 1 + len(layers)
    fig, axes = plt.subplots(rows, cols, figsize=(1.15 * cols + 1.2, 1.15 * rows + 1.4), squeeze=False,
                             layout="constrained")
    priority_max = max(float(maps[n]["priority"].max()) for n in layers) or 1.0
    for i in range(n_img):
        for r, (label, key, cmap) in enumerate(_TOKEN_KINDS):
            row = i * kinds + r
            axes[row, 0].axis("off")
            if r == 0:
                axes[row, 0].imshow(images[i], cmap="gray")
                axes[row, 0].set_title(f"image {i}", fontsize=8)
            axes[row, 1].set_ylabel(label, fontsize=7)
            for j, layer in enumerate(layers):
                grid = maps[layer][key][i]
                lo, hi = {"priority": (0, priority_max), "expert": (0, 9)}.get(key, (0, 1))
                ax = axes[row, 1 + j]
                ax.imshow(images[i], cmap="gray", extent=(0, grid.shape[1], grid.shape[0], 0))
                ax.imshow(grid, cmap=cmap, alpha=0.6, vmin=lo, vmax=hi,
                          extent=(0, grid.shape[1], grid.shape[0], 0), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(layer.replace("encoderblock_", "block "), fontsize=8)
    handles = [Patch(color=cm.Greens(0.9), alpha=0.6, label="processed by >= 1 expert"),
               Patch(color=cm.Greens(0.0), label="dropped (rides the residual)")]
    handles += [Patch(color=cm.tab10(e / 9 if experts <= 10 else e % 10 / 9), alpha=0.8, label=f"expert {e}")
                for e in range(min(experts, 10))]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7, frameon=False)
    mappable = cm.ScalarMappable(norm=colors.Normalize(0, priority_max), cmap="magma")
    fig.colorbar(mappable, ax=axes, location="right", shrink=0.25, label="BPR priority (top gate)")
    fig.suptitle(f"Token maps at capacity factor C={capacity_factor}", fontsize=10)
    _save(fig, path)


def plot_expert_load(load: dict[str, np.ndarray], dropped: dict[float, dict[str, float]], path: str) -> None:
    """Left: share of assignments per expert before the capacity cut.
    Right: dropped token fraction per layer against C (vanilla, trained K)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    layers = list(load)
    width = 0.8 / max(1, len(layers))
    for i, layer in enumerate(layers):
        e = np.arange(len(load[layer]))
        ax1.bar(e + i * width, load[layer], width=width, label=layer)
    ax1.axhline(1.0 / len(next(iter(load.values()))), color="k", linestyle=":", label="uniform 1/E")
    ax1.set_xlabel("expert")
    ax1.set_ylabel("share of (token, choice) assignments")
    ax1.set_title("Expert load before the capacity cut")
    ax1.legend(fontsize=7)
    cfs = sorted(dropped)
    for layer in layers:
        ax2.plot(cfs, [dropped[c].get(layer, np.nan) for c in cfs], marker="o", label=layer)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("capacity factor C (log scale)")
    ax2.set_ylabel("tokens with no expert (fraction)")
    ax2.set_title("Dropped tokens per layer (vanilla, trained K)")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_reliance(ablation: dict[str, float], position: dict[str, list[float]],
                  gates: dict[str, float], num_experts: int, path: str) -> None:
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    names = list(ablation)
    ax1.bar(names, [ablation[n] for n in names], color=["tab:blue", "tab:red"][: len(names)])
    ax1.set_ylabel("test accuracy (fraction)")
    ax1.set_title("Full capacity vs all MoE outputs zeroed")
    for label, accs in position.items():
        ax2.plot(range(len(accs)), accs, marker="o", label=label)
    ax2.set_xlabel("image position inside its routing group")
    ax2.set_ylabel("test accuracy (fraction)")
    ax2.set_title("Accuracy by position in the group")
    ax2.legend(fontsize=8)
    layers = list(gates)
    ax3.bar([name.replace("encoderblock_", "L") for name in layers], [gates[name] for name in layers])
    ax3.axhline(1.0 / num_experts, color="k", linestyle=":", label=f"uniform 1/E = {1 / num_experts:.3f}")
    ax3.set_xlabel("MoE layer")
    ax3.set_ylabel("mean top-1 gate")
    ax3.set_title("Router confidence")
    ax3.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_attack(results: dict[str, list[dict[str, Any]]], path: str) -> None:
    """Top-1 under PGD against eps (in grey levels of 255) per model, and
    each MoE layer's routing change against eps."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in results.items():
        rows = sorted(rows, key=lambda r: r["eps"])
        levels = [r["eps"] * 127.5 for r in rows]
        ax1.plot(levels, [r["adversarial_top1"] for r in rows], marker="o", label=f"{label}: attacked")
        ax1.axhline(rows[0]["clean_top1"], linestyle=":", color=ax1.lines[-1].get_color(),
                    label=f"{label}: clean")
        layers = sorted({name for r in rows for name in r["routing_changes"]})
        for name in layers:
            ax2.plot(levels, [r["routing_changes"].get(name, math.nan) for r in rows], marker=".",
                     label=f"{label}: {name}")
    ax1.set(xlabel="eps (grey levels of 255)", ylabel="top-1", title="Accuracy under PGD")
    ax2.set(xlabel="eps (grey levels of 255)", ylabel="1 - IoU of selected experts",
            title="Routing change per MoE layer")
    ax1.legend(fontsize=7)
    if ax2.lines:
        ax2.legend(fontsize=6, ncol=2, loc="lower right")
    _save(fig, path)
