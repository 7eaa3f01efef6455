"""PNG figures for the report (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..pipeline.prepared import PruneResult  # noqa: E402


def sweep_figure(result: PruneResult, path: str | os.PathLike) -> Path | None:
    """Held-out quality against params, MACs and (when timed) CPU latency kept, for every
    candidate the search evaluated, with the chosen model marked. None when there was no sweep
    (no --max-drop search)."""
    sweep, quality = result.sweep, result.quality
    if not sweep or quality is None:
        return None
    panels = [
        ("params", result.original.params, result.pruned.params, "params kept (fraction)"),
        ("macs", result.original.macs, result.pruned.macs, "MACs kept (fraction)"),
    ]
    chosen_latency = next((row["ratio"] for row in (result.latency or {}).get("cpu", []) if row["batch"] == 1), None)
    if all(p.latency_ratio is not None for p in sweep) and chosen_latency is not None:
        panels.append(("latency_ratio", 1, chosen_latency, "CPU latency at batch 1 (ratio)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True)
    for ax, (key, total, chosen, label) in zip(axes, panels):
        points = sorted(sweep, key=lambda p: getattr(p, key))
        ax.plot([getattr(p, key) / total for p in points], [p.quality for p in points], "o", color="tab:blue", label="evaluated")
        ax.axhline(quality.original, color="grey", linestyle=":", label="original")
        ax.plot([chosen / total], [quality.pruned], "*", color="tab:red", markersize=14, label="chosen")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out {quality.metric}")
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
