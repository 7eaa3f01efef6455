"""Choosing how many bases each layer keeps: pure functions of scores, cost model and target.

Every layer comes with an *order* of its bases per group (most important first) and a *score* per
basis, normalised per layer so that one global threshold ranks bases across layers. Data-free
pruning scores a basis by its share of the layer's squared singular values; the calibrated path
passes Taylor importances instead. A kept rank is rounded up to the provider's block size; when
the aligned rank no longer beats the original layer's cost, the layer is recomposed (or kept when
nothing was cut).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..basis.layers import Layer
from ..basis.rewrite import Decision
from ..basis.svd import energy_rank, top_keep
from ..runtime.machine import cpu_vector_extension
from .bisection import first_fitting


@dataclass(frozen=True)
class LayerScores:
    """Per-group basis order (most important first) and normalised scores, both (groups, r)."""

    order: np.ndarray
    scores: np.ndarray

    def count_at(self, threshold: float) -> int:
        """Bases kept per group at a global score threshold (at least one)."""
        return max(1, int((self.scores >= threshold).sum(axis=1).max()))


def l2_normalised(values: np.ndarray) -> np.ndarray:
    """``values`` over their L2 norm (Molchanov et al. 2016), so that one global threshold ranks
    the scores of different layers (or channel families); all-zero values stay as they are."""
    norm = np.linalg.norm(values)
    return values / norm if norm > 0 else values


def energy_scores(layer: Layer) -> LayerScores:
    """Data-free scores: each basis's share of the layer's squared singular values."""
    sq = layer.svd.s**2
    total = sq.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    return LayerScores(order=top_keep(layer.groups, layer.full_rank), scores=sq / total)


def output_energy_scores(layer: Layer) -> LayerScores:
    """Data-aware scores: each basis's share of the layer's output energy on calibration data,
    ``s_i^2 E[b_i^2]`` (the columns of U are orthonormal, so contributions add up)."""
    power = np.diagonal(layer.stats.second, axis1=1, axis2=2) * layer.svd.s**2
    total = power.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    scores = power / total
    return LayerScores(order=np.argsort(-scores, axis=1, kind="stable"), scores=scores)


def per_unit_cost(scores: Mapping[str, LayerScores], layers: Mapping[str, Layer], cost: str) -> dict[str, LayerScores]:
    """Scores divided by what one basis of the layer costs (``params`` or ``macs``), for ranking
    under a budget of that cost: a basis of a layer at 32x32 positions costs 16 times the MACs of
    one at 8x8. Only ratios between layers matter (one global threshold)."""
    unit = {name: layers[name].split_params(1) * (1 if cost == "params" else layers[name].positions) for name in scores}
    mean = float(np.mean(list(unit.values()))) if unit else 1.0
    return {name: LayerScores(s.order, s.scores * (mean / max(unit[name], 1))) for name, s in scores.items()}


def cpu_block_size() -> int:
    """Channel block of onnxruntime's CPU convolutions: 16 with AVX-512, else 8."""
    return 16 if cpu_vector_extension() == "AVX-512" else 8


def block_size(provider: str) -> int:
    """Rank alignment for the target execution provider ("cpu" or "cuda"); env override for tests."""
    if "BASISPRUNE_BLOCK" in os.environ:
        return int(os.environ["BASISPRUNE_BLOCK"])
    return 8 if provider == "cuda" else cpu_block_size()


def align(rank: int, full_rank: int, block: int, groups: int = 1) -> int:
    """Round ``rank`` up so the basis output (groups * rank channels) is a multiple of ``block``."""
    step = block // np.gcd(block, groups)
    return min(full_rank, -(-rank // step) * step)


def decide(layer: Layer, order: np.ndarray | None, count: int, block: int, split_full_rank: bool = False) -> Decision:
    """The action for one layer keeping ``count`` bases per group in the given ``order``."""
    if layer.skip_reason is not None:
        return Decision("skipped", layer.skip_reason)
    full = layer.full_rank
    order = top_keep(layer.groups, full) if order is None else order
    if split_full_rank:
        return Decision("decomposed", "full-rank split", order[:, :full])
    if count >= full:
        return Decision("kept", "nothing pruned")
    aligned = align(count, full, block, layer.groups)
    if aligned >= full:
        return Decision("kept", f"rank {count} aligns to the full rank {full}")
    # Without the output size the break-even rank counts weights only (Layer.model_break_even_rank).
    note = "" if layer.positions_known else " (output size unknown: break-even by weights)"
    if aligned <= layer.break_even_rank:
        reason = f"rank {count} of {full}" + (f", aligned to {aligned}" if aligned != count else "") + note
        return Decision("decomposed", reason, np.sort(order[:, :aligned], axis=1))
    return Decision(
        "recomposed",
        f"rank {count} (aligned {aligned}) above break-even {layer.break_even_rank}{note}",
        np.sort(order[:, :count], axis=1),
    )


def layer_params(layer: Layer, decision: Decision) -> int:
    return layer.split_params(decision.rank) if decision.action == "decomposed" else layer.params


def layer_macs(layer: Layer, decision: Decision) -> int:
    return layer.split_macs(decision.rank) if decision.action == "decomposed" else layer.macs


def energy_plan(layers: Mapping[str, Layer], energy: float, block: int) -> dict[str, Decision]:
    """Per layer, the smallest rank covering ``energy`` of the squared singular values."""
    return {
        name: decide(layer, None, energy_rank(layer.svd.s, energy) if layer.svd is not None else 0, block)
        for name, layer in layers.items()
    }


def full_rank_plan(layers: Mapping[str, Layer]) -> dict[str, Decision]:
    return {name: decide(layer, None, layer.full_rank, 1, split_full_rank=True) for name, layer in layers.items()}


def threshold_plan(
    layers: Mapping[str, Layer], scores: Mapping[str, LayerScores], threshold: float, block: int
) -> dict[str, Decision]:
    """Decisions keeping, in every scored layer, the bases whose score reaches ``threshold``."""
    plan = {}
    for name, layer in layers.items():
        s = scores.get(name)
        plan[name] = decide(layer, None if s is None else s.order, layer.full_rank if s is None else s.count_at(threshold), block)
    return plan


def candidate_thresholds(scores: Mapping[str, LayerScores]) -> np.ndarray:
    """Every distinct score, ascending: the thresholds at which some layer's rank changes."""
    if not scores:
        return np.zeros(1)
    return np.unique(np.concatenate([s.scores.ravel() for s in scores.values()]))


def budget_plan(
    layers: Mapping[str, Layer],
    scores: Mapping[str, LayerScores],
    measure: Callable[[dict[str, Decision]], float],
    budget: float,
    block: int,
) -> dict[str, Decision] | None:
    """The plan with the lowest global threshold whose ``measure`` is within ``budget``.

    ``measure`` is monotone non-increasing in the threshold (params or MACs of the model), so a
    bisection over the candidate thresholds finds it. None when even the strongest pruning misses.
    """
    thresholds = np.append(candidate_thresholds(scores), np.inf)

    def plan_at(i: int) -> dict[str, Decision]:
        return threshold_plan(layers, scores, thresholds[i], block)

    first = first_fitting(len(thresholds) - 1, lambda i: measure(plan_at(i)) <= budget)
    return None if first is None else plan_at(first)
