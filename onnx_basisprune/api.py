"""The Python API the CLI is a thin layer over: ``inspect``, ``decompose`` and ``prune``.

    >>> from onnx_basisprune import prune
    >>> result = prune("model.onnx", energy=0.99)
    >>> result.save("model.pruned.onnx"); print(result.pruned.params / result.original.params)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from . import ranks
from .cost import ModelCost, count_params, model_cost
from .errors import BasisPruneError
from .layers import Layer, find_layers
from .modelio import load_model, save_model
from .normalize import normalize
from .rewrite import ApplyDecisionsPass, Decision
from .shapes import ShapeTable, infer_shapes, require_input_sizes
from .svd import energy_rank

if TYPE_CHECKING:
    from .latency import LatencyTable

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


@dataclass
class Prepared:
    """A normalised copy of the user's model with its splittable layers analysed."""

    model: ir.Model
    layers: dict[str, Layer]
    shapes: ShapeTable
    original: ModelCost
    normalised_params: int
    input_shapes: Mapping[str, Sequence[int]] | None = None

    def splittable(self) -> dict[str, Layer]:
        return {name: layer for name, layer in self.layers.items() if layer.skip_reason is None}

    def use_input_shapes(self, input_shapes: Mapping[str, Sequence[int]]) -> None:
        """Sizes for the model's symbolic inputs learned after :func:`prepare` (from calibration
        data): shapes, the layers' positions and the original MACs follow; the SVDs stay."""
        self.input_shapes = dict(input_shapes)
        self.shapes = infer_shapes(self.model, self.input_shapes)
        for name, fresh in find_layers(self.model, self.shapes, with_svd=False).items():
            self.layers[name].positions, self.layers[name].skip_reason = fresh.positions, fresh.skip_reason
        self.original = ModelCost(self.original.params, model_cost(self.model, self.shapes).macs)


@dataclass
class LayerReport:
    name: str
    op: str
    weight_shape: list[int]
    full_rank: int
    break_even_rank: int
    kept_rank: int | None
    action: str
    reason: str
    params: int
    pruned_params: int
    macs: int | None  # None: output size unknown (symbolic input size)
    pruned_macs: int | None


@dataclass
class PruneResult:
    """The rewritten model and its costs. ``reference``: the user's model when ``model`` computes
    the same function (a full-rank split), checked against it on saving; ``input_shapes``: the
    input sizes the costs were counted at, where the model's own are symbolic."""

    model: ir.Model
    original: ModelCost
    pruned: ModelCost
    layers: list[LayerReport]
    extra: dict = field(default_factory=dict)
    reference: ir.Model | None = None
    input_shapes: Mapping[str, Sequence[int]] | None = None

    def to_proto(self) -> onnx.ModelProto:
        """A self-contained proto: tensors still read lazily from the input's external data file
        are brought into memory first (their references are relative to the input's folder)."""
        ir.external_data.load_to_model(self.model)
        return ir.to_proto(self.model)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model atomically, once it passes :func:`.verify.verify_model`."""
        save_model(self.model, path, self.reference, self.input_shapes)

    def to_json(self) -> dict:
        return {
            "original": asdict(self.original),
            "pruned": asdict(self.pruned),
            "layers": [asdict(layer) for layer in self.layers],
            **self.extra,
        }


def _as_ir(model: ModelLike) -> ir.Model:
    """A private ir.Model the pipeline may change freely: the caller's object is never touched."""
    if isinstance(model, ir.Model):
        return ir.serde.deserialize_model(ir.to_proto(model))
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(copy.deepcopy(model))
    return load_model(model)


def prepare(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Prepared:
    """Load (or copy), normalise, infer shapes and analyse every Conv/Gemm/MatMul."""
    irm = _as_ir(model)
    params = count_params(irm)
    try:
        normalize(irm)
    except Exception as exc:  # a pass failing on a malformed graph
        raise BasisPruneError(f"could not normalise the model: {str(exc).splitlines()[0]}") from None
    shapes = infer_shapes(irm, input_shapes)
    layers = find_layers(irm, shapes)
    if not layers:
        raise BasisPruneError("nothing to decompose: the model has no Conv, Gemm or MatMul with a constant weight")
    if not any(layer.skip_reason is None for layer in layers.values()):
        reasons = sorted({layer.skip_reason for layer in layers.values()})
        raise BasisPruneError(f"nothing to decompose: all {len(layers)} layers are skipped ({'; '.join(reasons)})")
    original = ModelCost(params=params, macs=model_cost(irm, shapes).macs)
    return Prepared(irm, layers, shapes, original, count_params(irm), input_shapes)


def rewritten(prepared: Prepared, plan: Mapping[str, Decision], in_place: bool = False) -> ir.Model:
    """The prepared model (a copy unless ``in_place``) rewritten by ``plan``."""
    model = prepared.model if in_place else ir.serde.deserialize_model(ir.to_proto(prepared.model))
    ApplyDecisionsPass(prepared.layers, dict(plan))(model)
    return model


def apply_plan(prepared: Prepared, plan: Mapping[str, Decision], in_place: bool = False) -> PruneResult:
    """Rewrite the prepared model by ``plan`` and measure the result."""
    model = rewritten(prepared, plan, in_place)
    pruned = model_cost(model, infer_shapes(model, prepared.input_shapes))
    return PruneResult(model, prepared.original, pruned, layer_reports(prepared.layers, plan),
                       input_shapes=prepared.input_shapes)


def layer_reports(layers: Mapping[str, Layer], plan: Mapping[str, Decision]) -> list[LayerReport]:
    reports = []
    for name, layer in layers.items():
        decision = plan.get(name) or Decision("kept", "not selected")
        reports.append(
            LayerReport(
                name=name,
                op=layer.op,
                weight_shape=list(layer.weight_shape),
                full_rank=layer.full_rank,
                break_even_rank=layer.break_even_rank,
                kept_rank=layer.full_rank if decision.action == "kept" else decision.rank,
                action=decision.action,
                reason=decision.reason,
                params=layer.params,
                pruned_params=ranks.layer_params(layer, decision),
                macs=layer.macs if layer.positions_known else None,
                pruned_macs=ranks.layer_macs(layer, decision) if layer.positions_known else None,
            )
        )
    return reports


def decompose(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> PruneResult:
    """Split every splittable layer at full rank: the result computes the same function (checked
    against the user's model when saved)."""
    prepared = prepare(model, input_shapes)
    result = apply_plan(prepared, ranks.full_rank_plan(prepared.layers), in_place=True)
    result.reference = _as_ir(model)
    return result


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise BasisPruneError(f"{name} must be in (0, 1], got {value}")


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


def plan_cost(prepared: Prepared, plan: Mapping[str, Decision]) -> tuple[int, int | None]:
    """(params, MACs) of the model after ``plan``, from the layer records (no rewrite needed);
    MACs None where unknown (symbolic input size)."""
    params, macs = prepared.normalised_params, prepared.original.macs
    for name, decision in plan.items():
        layer = prepared.layers[name]
        params += ranks.layer_params(layer, decision) - layer.params
        if macs is not None:
            macs += ranks.layer_macs(layer, decision) - layer.macs
    return params, macs


def use_measured_latency(
    prepared: Prepared, provider: str, block: int, batches: Sequence[int] = (1,)
) -> LatencyTable:
    """Time every layer on ``provider`` at each batch size (cached) and let those times set the
    break-even ranks: a layer is split at most at the largest rank that is faster at every batch.
    Returns the table of the first batch size (predictions and ``--target-latency`` use it)."""
    from .latency import measure_latency_table

    if not batches:
        raise BasisPruneError("use_measured_latency needs at least one batch size")
    tables = [measure_latency_table(prepared, provider=provider, block=block, batch=b) for b in dict.fromkeys(batches)]
    for name, layer in prepared.splittable().items():
        measured = [t.break_even_rank(name) for t in tables if name in t.layers]
        if measured:
            layer.measured_break_even = min(measured)
    return tables[0]


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


def prune(
    model: ModelLike,
    *,
    energy: float | None = None,
    target_params: float | None = None,
    target_macs: float | None = None,
    target_latency: float | None = None,
    latency_aware: bool = False,
    provider: str = "cpu",
    latency_batches: Sequence[int] = (1,),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> PruneResult:
    """Data-free pruning: keep per layer the bases covering ``energy`` (default 0.99) of the
    squared singular values, or meet ``target_params`` / ``target_macs`` / ``target_latency``
    (fraction that remains). ``latency_aware`` (implied by ``target_latency``) times every layer
    on ``provider`` at each of ``latency_batches`` and splits a layer only where that saves time
    at all of them; the prediction and ``target_latency`` use the first batch size."""
    targets = {"energy": energy, "target_params": target_params, "target_macs": target_macs, "target_latency": target_latency}
    if sum(x is not None for x in targets.values()) > 1:
        raise BasisPruneError("give one of energy, target_params, target_macs, target_latency")
    for name, value in targets.items():
        _check_fraction(name, value)
    prepared = prepare(model, input_shapes)
    table = None
    if latency_aware or target_latency is not None:
        table = use_measured_latency(prepared, provider, ranks.block_size(provider), latency_batches)
    plan = data_free_plan(prepared, energy=energy, target_params=target_params, target_macs=target_macs,
                          provider=provider, target_latency=target_latency, table=table)
    result = apply_plan(prepared, plan, in_place=True)
    if table is not None:
        result.extra["predicted_latency_ratio"] = predicted_latency_ratio(prepared, plan, table)
    return result


@dataclass
class InspectRow:
    name: str
    op: str
    weight_shape: list[int]
    full_rank: int
    break_even_rank: int
    rank_90: int | None
    rank_99: int | None
    rank_999: int | None
    params: int
    macs: int | None  # None: output size unknown
    note: str


def inspect(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[Prepared, list[InspectRow]]:
    """Per layer: op, weight shape, full and break-even rank, ranks at 90/99/99.9% energy, cost."""
    prepared = prepare(model, input_shapes)
    rows = []
    for layer in prepared.layers.values():
        at = (lambda e: energy_rank(layer.svd.s, e)) if layer.svd is not None else (lambda e: None)
        rows.append(
            InspectRow(
                name=layer.name,
                op=layer.op,
                weight_shape=list(layer.weight_shape),
                full_rank=layer.full_rank,
                break_even_rank=layer.break_even_rank,
                rank_90=at(0.90),
                rank_99=at(0.99),
                rank_999=at(0.999),
                params=layer.params,
                macs=layer.macs if layer.positions_known else None,
                note=layer.skip_reason or "",
            )
        )
    return prepared, rows
