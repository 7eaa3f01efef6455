"""PNG figures for the report (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .api import PruneResult  # noqa: E402


def sweep_figure(result: PruneResult, path: str | os.PathLike) -> Path | None:
    """Held-out quality against params and MACs kept, for every candidate the search evaluated,
    with the chosen model marked. None when there was no sweep (no --max-drop search)."""
    sweep = result.extra.get("sweep")
    quality = result.extra.get("quality")
    if not sweep or not quality:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, total, chosen, label in (
        (axes[0], "params", result.original.params, result.pruned.params, "params kept (fraction)"),
        (axes[1], "macs", result.original.macs, result.pruned.macs, "MACs kept (fraction)"),
    ):
        points = sorted(sweep, key=lambda p: p[key])
        ax.plot([p[key] / total for p in points], [p["quality"] for p in points], "o-", color="tab:blue", label="evaluated")
        ax.axhline(quality["original"], color="grey", linestyle=":", label="original")
        ax.plot([chosen / total], [quality["pruned"]], "*", color="tab:red", markersize=14, label="chosen")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out {quality['metric']}")
    axes[0].legend(loc="lower right")
    fig.suptitle("Pruning sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def ranks_figure(result: PruneResult, path: str | os.PathLike) -> Path:
    """Full and kept rank per layer, coloured by action."""
    colours = {"decomposed": "tab:green", "recomposed": "tab:orange", "kept": "tab:grey", "skipped": "lightgrey"}
    layers = result.layers
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(layers) + 2), 4))
    xs = range(len(layers))
    ax.bar(xs, [layer.full_rank for layer in layers], color="none", edgecolor="black", linewidth=0.6, label="full rank")
    ax.bar(xs, [layer.kept_rank or 0 for layer in layers], color=[colours[layer.action] for layer in layers])
    for action, colour in colours.items():
        ax.bar([0], [0], color=colour, label=action)
    ax.set_xticks(list(xs), [layer.name for layer in layers], rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Kept rank per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
