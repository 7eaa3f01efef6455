"""Plans without calibration data: by singular-value energy, under a params/MACs/latency
budget, and with break-even ranks measured on the target provider."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..basis.rewrite import Decision
from ..errors import BasisPruneError
from ..io.shapes import require_input_sizes
from ..pipeline.prepared import Prepared, plan_cost
from . import ranks

if TYPE_CHECKING:
    from ..runtime.latency import LatencyTable


def data_free_plan(
    prepared: Prepared,
    *,
    energy: float | None = None,
    target_params: float | None = None,
    target_macs: float | None = None,
    provider: str = "cpu",
    target_latency: float | None = None,
    table: LatencyTable | None = None,
) -> dict[str, Decision]:
    """Plan by singular-value energy: per layer (``energy``) or under a global budget."""
    block = ranks.block_size(provider)
    if target_params is None and target_macs is None and target_latency is None:
        return ranks.energy_plan(prepared.layers, 0.99 if energy is None else energy, block)
    scores = {name: ranks.energy_scores(layer) for name, layer in prepared.splittable().items()}
    return budget_plan(prepared, scores, target_params=target_params, target_macs=target_macs, block=block,
                       target_latency=target_latency, table=table)


def use_measured_latency(
    prepared: Prepared, provider: str, block: int, batches: Sequence[int] = (1,)
) -> tuple[Prepared, LatencyTable]:
    """Time every layer on ``provider`` at each batch size (cached) and let those times set the
    break-even ranks: a layer is split at most at the largest rank that is faster at every batch.
    Returns the preparation with those ranks and the table of the first batch size (predictions
    and ``target_latency`` use it)."""
    from ..runtime.latency import measure_latency_table

    if not batches:
        raise BasisPruneError("use_measured_latency needs at least one batch size")
    tables = [measure_latency_table(prepared, provider=provider, block=block, batch=b) for b in dict.fromkeys(batches)]
    measured = {}
    for name in prepared.splittable():
        ranks_at = [t.break_even_rank(name) for t in tables if name in t.layers]
        if ranks_at:
            measured[name] = min(ranks_at)
    return prepared.with_layer_values("measured_break_even", measured), tables[0]


def predicted_latency_ratio(prepared: Prepared, plan: Mapping[str, Decision], table: LatencyTable) -> float:
    """Whole-model latency after ``plan`` relative to before, from the per-layer table: the
    splittable layers' summed time, pruned over original (other ops taken as unchanged in share)."""
    before = sum(table.layers[name].original_ms for name in table.layers)
    after = 0.0
    for name in table.layers:
        decision = plan.get(name)
        split = decision is not None and decision.action == "decomposed"
        after += table.layer_ms(name, decision.rank if split else None)
    return after / before if before > 0 else 1.0


def budget_plan(
    prepared: Prepared,
    scores: Mapping[str, ranks.LayerScores],
    *,
    target_params: float | None,
    target_macs: float | None,
    block: int,
    target_latency: float | None = None,
    table: LatencyTable | None = None,
) -> dict[str, Decision]:
    """The least pruning that meets a params, MACs or latency fraction: bases are ranked by score
    per unit of what the budget counts (params, or MACs, also for latency), the greedy order for
    a knapsack, and cut at the lowest global threshold that fits."""
    layers = prepared.layers
    if target_macs is not None:
        require_input_sizes(prepared.model, prepared.input_shapes, "a MACs target")
    scores = ranks.per_unit_cost(scores, layers, "params" if target_params is not None else "macs")
    if target_latency is not None:
        label, value, total = "latency", target_latency, 1.0

        def measure(plan: dict[str, Decision]) -> float:
            return predicted_latency_ratio(prepared, plan, table)

    else:
        index = 0 if target_params is not None else 1
        label, value = ("params", target_params) if index == 0 else ("MACs", target_macs)
        total = prepared.original.params if index == 0 else prepared.original.macs

        def measure(plan: dict[str, Decision]) -> float:
            return plan_cost(prepared, plan)[index]

    budget = value * total
    plan = ranks.budget_plan(layers, scores, measure, budget, block)
    if plan is None:
        floor = measure(ranks.threshold_plan(layers, scores, np.inf, block))
        raise BasisPruneError(
            f"target {label} {value:g} is out of reach: the strongest basis pruning keeps {floor / total:.3f}"
        )
    return plan
