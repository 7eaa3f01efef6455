"""Choosing which channel groups to remove: pure functions of importances, the channel analysis
and a target, like :mod:`onnx_basisprune.plan.ranks` is for bases.

A *family* is the set of prunable groups that share the same producing layers (the output
channels of one Conv, or one residual stream fed by several Convs). Importances are L2-normalised
per family (Molchanov et al. 2016) so that one global threshold ranks channels across layers.
Each family keeps at least one group, and the number it keeps is rounded up to the provider's
channel block, as kept ranks are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..plan.bisection import first_fitting
from ..plan.ranks import align, l2_normalised
from .analysis import ChannelAnalysis


@dataclass(frozen=True)
class ChannelScores:
    """Per-family normalised scores of the prunable groups."""

    families: list[np.ndarray]  # group indices of each family, most important first
    scores: np.ndarray  # (groups,) normalised score; NaN for unprunable groups

    def thresholds(self) -> np.ndarray:
        """Every distinct score, ascending: where some family's kept count changes."""
        values = self.scores[np.isfinite(self.scores)]
        return np.unique(values) if values.size else np.zeros(1)


def family_scores(analysis: ChannelAnalysis, importance: np.ndarray) -> ChannelScores:
    """Group the prunable groups by their producers and L2-normalise ``importance`` per family."""
    importance = np.asarray(importance, dtype=np.float64)
    by_producers: dict[tuple[str, ...], list[int]] = {}
    for index in analysis.removable():
        by_producers.setdefault(tuple(sorted(analysis.groups[index].producers)), []).append(index)
    scores = np.full(len(analysis.groups), np.nan)
    families = []
    for members in by_producers.values():
        idx = np.asarray(members)
        scores[idx] = l2_normalised(importance[idx])
        families.append(idx[np.argsort(-scores[idx], kind="stable")])
    return ChannelScores(families, scores)


def per_unit_cost(analysis: ChannelAnalysis, scores: ChannelScores, cost: str) -> ChannelScores:
    """Scores divided by what removing the group alone saves (``params`` or ``macs``), for ranking
    under a budget of that cost, as :func:`onnx_basisprune.plan.ranks.per_unit_cost` does for bases."""
    index = 0 if cost == "params" else 1
    none = np.zeros(len(analysis.groups), dtype=bool)
    base = analysis.cost(none)[index]
    unit = np.full(len(analysis.groups), np.nan)
    for family in scores.families:
        for g in family:
            one = none.copy()
            one[g] = True
            unit[g] = max(base - analysis.cost(one)[index], 1)
    weighted = scores.scores * (np.nanmean(unit) / unit) if np.isfinite(unit).any() else scores.scores
    families = [family[np.argsort(-weighted[family], kind="stable")] for family in scores.families]
    return ChannelScores(families, weighted)


def removal_at(analysis: ChannelAnalysis, scores: ChannelScores, threshold: float, block: int) -> np.ndarray:
    """Groups removed at a global threshold: in each family those scoring below it, keeping at
    least one group and a block-aligned count (the most important ones). A tensor holding only
    part of a family (a Split or Slice output) keeps its most important group."""
    removed = np.zeros(len(scores.scores), dtype=bool)
    for family in scores.families:
        keep = max(1, int((scores.scores[family] >= threshold).sum()))
        keep = align(keep, len(family), block)
        removed[family[keep:]] = True
    for tensor in analysis.emptied(removed):
        members = [g.index for g in analysis.groups if tensor in g.elements and g.prunable]
        removed[max(members, key=lambda g: scores.scores[g])] = False
    return removed


def removal_for_budget(analysis: ChannelAnalysis, scores: ChannelScores, measure: Callable[[np.ndarray], float],
                       budget: float, block: int) -> np.ndarray | None:
    """The removal at the lowest threshold whose ``measure`` (params or MACs of the model, non-
    increasing in the threshold) is within ``budget``; None when even the strongest misses."""
    thresholds = np.append(scores.thresholds(), np.inf)

    def removal(i: int) -> np.ndarray:
        return removal_at(analysis, scores, thresholds[i], block)

    first = first_fitting(len(thresholds) - 1, lambda i: measure(removal(i)) <= budget)
    return None if first is None else removal(first)
