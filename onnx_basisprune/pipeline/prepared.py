"""The user's model made ready to prune, and what a plan makes of it.

:func:`prepare` loads (or copies) the model, normalises it, infers shapes and analyses every
Conv/Gemm/MatMul (:class:`Prepared`); :func:`rewritten` and :func:`apply_plan` turn a plan (one
:class:`~onnx_basisprune.basis.rewrite.Decision` per layer) into a new model and its :class:`PruneResult`. Stages
derive new :class:`Prepared` values (``with_input_shapes``, ``with_layer_values``) instead of
changing a shared one.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir

from ..basis.fuse import fuse_linear
from ..basis.layers import Layer, find_layers
from ..basis.rewrite import ApplyDecisionsPass, Decision
from ..errors import BasisPruneError
from ..io.cost import ModelCost, count_params, model_cost
from ..io.model_io import load_model, save_model
from ..io.normalize import normalize
from ..io.shapes import ShapeTable, infer_shapes
from ..plan import ranks

if TYPE_CHECKING:
    from ..plan.search import QualitySummary, SweepPoint
    from ..runtime.speed_check import SpeedCheck

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

    def with_input_shapes(self, input_shapes: Mapping[str, Sequence[int]]) -> Prepared:
        """This preparation with sizes for the model's symbolic inputs learned after :func:`prepare`
        (from calibration data): shapes, the layers' positions and the original MACs follow; the
        SVDs are shared."""
        shapes = infer_shapes(self.model, input_shapes)
        fresh = find_layers(self.model, shapes, with_svd=False)
        layers = {name: replace(layer, positions=fresh[name].positions, skip_reason=fresh[name].skip_reason)
                  for name, layer in self.layers.items()}
        return replace(self, layers=layers, shapes=shapes, input_shapes=dict(input_shapes),
                       original=ModelCost(self.original.params, model_cost(self.model, shapes).macs))

    def with_layer_values(self, field_name: str, values: Mapping[str, object]) -> Prepared:
        """This preparation whose layers named in ``values`` carry a new value of one field
        (measured statistics, a measured break-even rank); the others are shared."""
        layers = {name: replace(layer, **{field_name: values[name]}) if name in values else layer
                  for name, layer in self.layers.items()}
        return replace(self, layers=layers)


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
    reference: ir.Model | None = None
    input_shapes: Mapping[str, Sequence[int]] | None = None
    quality: QualitySummary | None = None  # held-out quality of the pruned model (main job)
    calibration: dict | None = None  # what was measured on the calibration data, and how
    importance: dict[str, dict] | None = None  # per layer: normalised score range and the kept share
    sweep: list[SweepPoint] = field(default_factory=list)  # the candidates the quality search evaluated
    predicted_latency_ratio: float | None = None  # from per-layer timings (latency-aware runs)
    double: dict | None = None  # double pruning: the budget shares tried and the one chosen
    channels: list[dict] | None = None  # double pruning: the channels removed per coupled group
    latency: dict[str, list[dict]] | None = None  # provider -> per batch size: original and pruned ms, ratio
    latency_environment: dict[str, str] | None = None  # where the latency was measured
    speed_check: SpeedCheck | None = None  # the final model timed against the original

    def to_proto(self) -> onnx.ModelProto:
        """A self-contained proto: tensors still read lazily from the input's external data file
        are brought into memory first (their references are relative to the input's folder)."""
        ir.external_data.load_to_model(self.model)
        return ir.to_proto(self.model)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model atomically, once it passes :func:`onnx_basisprune.io.verify.verify_model`."""
        save_model(self.model, path, self.reference, self.input_shapes)

    def to_json(self) -> dict:
        """The report: costs, layers, and every measurement that was made (absent ones left out)."""
        out: dict = {"original": asdict(self.original), "pruned": asdict(self.pruned),
                     "layers": [asdict(layer) for layer in self.layers]}
        if self.quality is not None:
            out["quality"] = asdict(self.quality)
        for name in ("calibration", "importance", "predicted_latency_ratio", "double", "channels", "latency",
                     "latency_environment"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.speed_check is not None:
            out["speed_check"] = self.speed_check.to_json()
        if self.sweep:
            out["sweep"] = [asdict(p) for p in sorted(self.sweep, key=lambda p: p.threshold)]
        return out


def as_ir(model: ModelLike) -> ir.Model:
    """A private ir.Model the pipeline may change freely: the caller's object is never touched."""
    if isinstance(model, ir.Model):
        return model.clone()
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(copy.deepcopy(model))
    return load_model(model)


def prepare(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Prepared:
    """Load (or copy), normalise, infer shapes and analyse every Conv/Gemm/MatMul."""
    irm = as_ir(model)
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
    model = prepared.model if in_place else prepared.model.clone()
    ApplyDecisionsPass(prepared.layers, dict(plan))(model)
    return model


def final_model(prepared: Prepared, plan: Mapping[str, Decision], in_place: bool = False, fuse: bool = True) -> ir.Model:
    """The model handed over for ``plan``: rewritten, and with ``fuse`` the consecutive linear
    nodes the split leaves merged (:mod:`onnx_basisprune.basis.fuse`) where that costs no more."""
    model = rewritten(prepared, plan, in_place)
    return fuse_linear(model)[0] if fuse else model


def apply_plan(prepared: Prepared, plan: Mapping[str, Decision], in_place: bool = False, fuse: bool = True,
               model: ir.Model | None = None) -> PruneResult:
    """The :func:`final_model` of ``plan`` (or ``model``, already made so) and its costs."""
    model = model if model is not None else final_model(prepared, plan, in_place, fuse)
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
