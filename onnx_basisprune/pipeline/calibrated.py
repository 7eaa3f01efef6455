"""The main job: basis pruning driven by Taylor importance on the user's target-domain data.

decompose at full rank -> load calibration data -> importance of every basis scaling factor
(Torch, :mod:`onnx_basisprune.calibration`) -> choose ranks (target params/MACs, or the strongest
pruning within ``--max-drop`` points of held-out quality) -> rewrite -> report.

This module is the only place on the graph side that reaches the Torch-backed stage, and it
imports it lazily: ``import onnx_basisprune`` never imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..basis.rewrite import META_LAYER, META_ROLE, Decision
from ..basis.svd import BasisStats
from ..config import DataSource, PruneConfig, Target
from ..errors import BasisPruneError
from ..io.cost import ModelCost
from ..io.shapes import unsized_inputs
from ..plan import ranks
from ..plan.plans import budget_plan, predicted_latency_ratio, use_measured_latency
from ..plan.search import (CONFIDENCE, Evaluator, Quality, SweepPoint, chance_problem, describe_change, drop_bound,
                           images_to_certify, max_drop_plan, model_predictions, plan_signature)
from ..runtime.speed_check import check_speed
from .prepared import Prepared, PruneResult, apply_plan, final_model, plan_cost, rewritten

if TYPE_CHECKING:
    from ..runtime.latency import LatencyTable

NEAR_PERFECT = 0.99  # the original's held-out accuracy from which the held-out part is probably training data
# Images the sequential fit walks the graph with (a seeded random subset of the calibration part):
# each layer's moments use about 16 sampled rows per input dimension, which a few hundred images
# give many times over; more images only cost time, and memory (the fit holds the graph frontier
# of its images twice). The statistics pass (Fisher weights, original moments) uses every image.
FIT_SAMPLES = 512


def basis_gates(decomposed: ir.Model) -> dict[str, tuple[str, int]]:
    """Layer name -> (basis output tensor, channel axis), found by the split's node metadata."""
    gates = {}
    for node in decomposed.graph:
        if node.metadata_props.get(META_ROLE) == "basis":
            axis = 1 if node.op_type == "Conv" else -1
            gates[node.metadata_props[META_LAYER]] = (node.outputs[0].name, axis)
    return gates


def layer_scores(importance: Mapping[str, np.ndarray], groups: Mapping[str, int]) -> dict[str, ranks.LayerScores]:
    """Per-layer L2-normalised importances as (groups, r) with the per-group order."""
    out = {}
    for name, values in importance.items():
        v = ranks.l2_normalised(np.asarray(values, dtype=np.float64).reshape(groups[name], -1))
        out[name] = ranks.LayerScores(order=np.argsort(-v, axis=1, kind="stable"), scores=v)
    return out


def _image_size(spec, config: PruneConfig) -> tuple[int, int] | None:
    """(height, width) images are brought to: ``--crop``, else the input's size from
    ``--input-shape``, else the model's own; None where all are unknown (symbolic)."""
    if config.preprocessing.crop:
        return config.preprocessing.crop, config.preprocessing.crop
    shape = (config.input_shapes or {}).get(spec.name)
    if shape is not None and len(shape) == 4:
        return tuple(shape[2:4]) if spec.layout == "NCHW" else tuple(shape[1:3])
    return None if None in (spec.height, spec.width) else (spec.height, spec.width)


def _preprocess(spec, config: PruneConfig):
    """The default preprocessing for the model's image input with the user's overrides; None
    when the image size is unknown (arrays need none; an image folder then asks for the size)."""
    from ..calibration.data import Preprocess

    size = _image_size(spec, config)
    if size is None:
        return None
    overrides = config.preprocessing
    pre = Preprocess.default_for(spec, size)
    fields = {
        "resize": overrides.resize,
        "scale": overrides.scale,
        "mean": overrides.mean,
        "std": overrides.std,
        "bgr": True if overrides.bgr else None,
    }
    return dataclasses.replace(pre, **{k: v for k, v in fields.items() if v is not None})


def _is_folder(source: DataSource) -> bool:
    return isinstance(source, (str, Path)) and Path(source).is_dir()


def _load_data(config: PruneConfig, proto, num_classes: int | None):
    from ..calibration.data import InputSpec, load_calibration

    specs = InputSpec.from_model(proto)
    pre = _preprocess(specs[0], config) if len(specs) == 1 and specs[0].layout in ("NCHW", "NHWC") else None
    if pre is not None and config.progress:
        print(f"preprocessing: {pre.describe()}")

    def load(source: DataSource, limit: int | None = None):
        # class folders without labels are judged against the model by load_calibration_data, not refused here
        classes = None if config.labels is None and _is_folder(source) else num_classes
        return load_calibration(source, specs, pre, labels_file=config.labels, num_classes=classes, limit=limit,
                                seed=config.seed)

    calib = load(config.calib, config.limit)
    if config.eval is not None:
        heldout = load(config.eval)
    else:
        calib, heldout = calib.split(config.holdout, config.seed)
    if len(calib) == 0 or len(heldout) == 0:
        raise BasisPruneError(f"{calib.source}: too few samples to split into importance and held-out parts")
    if config.progress:
        print(f"calibration: {len(calib)} samples for importance, {len(heldout)} held out ({calib.source})")
    return calib, heldout


@dataclass(frozen=True)
class CalibrationData:
    """What every pruning stage measures with: the importance samples, the held-out evaluator
    (whose reference is the user's original model, whatever stage runs), the loss and the run's
    options."""

    calib: object  # calibration.data.CalibrationSet
    evaluator: Evaluator
    loss: str
    config: PruneConfig

    def batches(self):
        return self.calib.batches(self.config.batch_size)

    @property
    def n_batches(self) -> int:
        return -(-len(self.calib) // self.config.batch_size)

    def fit_batches(self):
        """Batches of the images the sequential fits walk the graph with: a seeded random subset
        of at most :data:`FIT_SAMPLES` of the calibration part."""
        fit_set = self.calib
        if len(fit_set) > FIT_SAMPLES:
            chosen = np.random.default_rng(self.config.seed).choice(len(fit_set), FIT_SAMPLES, replace=False)
            fit_set = fit_set.subset(np.sort(chosen))
        return fit_set.batches(self.config.batch_size)

    def pass_settings(self, progress: bool = True):
        """How a Torch pass over these batches runs (``calibration.importance.PassSettings``)."""
        from ..calibration.importance import PassSettings

        return PassSettings(self.loss, self.n_batches, self.config.device, self.config.seed, progress)


def load_calibration_data(prepared: Prepared, config: PruneConfig) -> CalibrationData:
    """Load ``--calib`` (and ``--eval``) for the model and set up the held-out evaluator. Labels
    that are not the model's classes are dropped (:func:`_unlabeled_reason`), and what the
    held-out set can promise is said before any long work (:func:`_check_heldout`)."""
    from ..calibration.importance import choose_loss

    out_shape = prepared.shapes.get(prepared.model.graph.outputs[0])
    num_classes = out_shape[1] if out_shape is not None and len(out_shape) == 2 else None
    calib, heldout = _load_data(config, ir.to_proto(prepared.model), num_classes)
    predictions = model_predictions(prepared.model, lambda: heldout.batches(64))
    reason = _unlabeled_reason(calib, heldout, predictions, num_classes, config.unlabeled)
    if reason:
        print(f"unlabeled: {reason}; quality is top-1 agreement with the original model, importance uses its own predictions")
        calib, heldout = calib.without_labels(), heldout.without_labels()
    evaluator = Evaluator(lambda: heldout.batches(64), heldout.labels, prepared.model, predictions)
    _check_heldout(evaluator, config.target(), separate=config.eval is not None)
    return CalibrationData(calib, evaluator, choose_loss(out_shape or (), calib.labels is not None), config)


def _unlabeled_reason(calib, heldout, predictions: np.ndarray, num_classes: int | None, forced: bool) -> str | None:
    """Why the loaded labels are not to be used (None: they are, or there are none): ``--unlabeled``,
    or class folders that cannot be the model's outputs, because no ``--labels`` maps them and their
    count differs from the outputs, or the original model scores at chance level with them."""
    if calib.labels is None and heldout.labels is None:
        return None
    if forced:
        return "--unlabeled"
    for part in (calib, heldout):
        if part.labels_from_folders and num_classes is not None and len(part.class_names) != num_classes:
            return f"{len(part.class_names)} class folders, the model has {num_classes} outputs and no --labels maps them"
    return chance_problem(predictions, heldout.labels) if heldout.labels_from_folders else None


def _check_heldout(evaluator: Evaluator, target: Target, separate: bool) -> None:
    """Say up front what the held-out set can promise: warn when the original is near-perfect on
    the held-out part of ``--calib``; refuse a ``--max-drop`` that even a candidate with every
    outcome of the original would not certify, and note one certified only for candidates that
    lose no image."""
    if evaluator.metric == "accuracy" and evaluator.original >= NEAR_PERFECT and not separate:
        print(f"warning: the original model scores {evaluator.original:.4f} accuracy on the held-out part of --calib, "
              "probably images it was trained on, where pruning looks safer than it is: use --eval with unseen images")
    if target.kind != "max-drop":
        return
    n, max_drop = evaluator.n, target.value
    needed = images_to_certify(max_drop, lost=1)
    if evaluator.bound_floor > max_drop:
        more = (f"that takes {images_to_certify(max_drop, lost=0)} images, {needed} to allow one lost image "
                "(--eval DIR or a larger --holdout); else use " if needed else "use ")
        raise BasisPruneError(
            f"{n} held-out images cannot certify --max-drop {max_drop:g}: even a candidate with every outcome of the "
            f"original has a {CONFIDENCE:.0%} drop bound of {evaluator.bound_floor:.2f} pt; {more}"
            "a larger --max-drop, --target-params or --target-macs")
    if n < needed:
        print(f"note: {n} held-out images certify --max-drop {max_drop:g} only for candidates that lose no image "
              f"(one lost image bounds the drop at {100 * drop_bound(1, 0, n)[1]:.2f} pt); {needed} images would allow one")


def torch_module(model: ir.Model, data: CalibrationData):
    """The model as a Torch module, checked against onnxruntime on the first calibration batch
    (unsupported ops are refused before any work)."""
    from ..calibration.interpreter import OnnxTorchModule, check_against_onnxruntime

    proto = ir.to_proto(model)
    module = OnnxTorchModule(proto)
    first_inputs, _ = next(data.calib.batches(min(data.config.batch_size, len(data.calib))))
    check_against_onnxruntime(module, proto, first_inputs)
    return module


@dataclass(frozen=True)
class BasisImportance:
    """What the importance pass measured on the decomposed model: Taylor statistics of every
    basis scaling factor and the basis-output moments; ``prepared`` is the preparation whose
    layers carry those moments (for the least-squares scaling)."""

    prepared: Prepared
    result: object  # calibration.importance.ImportanceResult

    def scores(self, criterion: str) -> dict[str, ranks.LayerScores]:
        """Per-layer normalised scores by ``criterion`` (energy, taylor or taylor-sq)."""
        layers = self.prepared.layers
        if criterion == "energy":
            return {name: ranks.output_energy_scores(layers[name]) for name in self.result.second}
        groups = {name: layers[name].groups for name in self.result.second}
        return layer_scores(self.result.by_criterion(criterion), groups)


def basis_importance(prepared: Prepared, data: CalibrationData, verbose: bool = True) -> BasisImportance:
    """Decompose at full rank and measure every basis on the calibration data (Torch)."""
    from ..calibration.importance import Gate, measure_importance

    decomposed = rewritten(prepared, ranks.full_rank_plan(prepared.layers))
    module = torch_module(decomposed, data)
    gates = {name: Gate(tensor, axis, prepared.layers[name].groups) for name, (tensor, axis) in basis_gates(decomposed).items()}
    importance = measure_importance(module, gates, data.batches(), data.pass_settings(verbose))
    stats = {name: BasisStats(importance.second[name], importance.mean[name]) for name in importance.second}
    return BasisImportance(prepared.with_layer_values("stats", stats), importance)


def data_aware_builder(prepared: Prepared, data: CalibrationData, verbose: bool = True):
    """The statistics pass on the original model (input moments and output Fisher weights of
    every refittable layer) and the builder that refits plans in graph order."""
    from ..calibration.reconstruction import layer_statistics
    from ..basis.data_aware import SequentialBuilder, layer_targets

    config = data.config
    targets = layer_targets(prepared.model, prepared.layers, prepared.shapes)
    module = torch_module(prepared.model, data)
    sites = {name: t.site() for name, t in targets.items()}
    stats = layer_statistics(module, sites, data.batches(), data.pass_settings(verbose))
    builder = SequentialBuilder(module, targets, stats.fisher, data.fit_batches, config.device, config.seed, verbose)
    return targets, stats, builder


def basis_stage(prepared: Prepared, data: CalibrationData, target: Target, reference: ModelCost,
                latency_scale: float = 1.0, verbose: bool = True, final: bool = True,
                measured: BasisImportance | None = None) -> PruneResult:
    """Basis pruning of ``prepared`` to ``target``.

    Allocation by ``--criterion``: ``fisher`` (the default) ranks the bases of the data-aware
    split by Fisher-weighted output error (:mod:`onnx_basisprune.basis.data_aware`); ``energy``/``taylor``/``taylor-sq``
    rank the weight-SVD bases by the importance pass (unless already ``measured``). Fit by
    ``--fit``: ``sequential`` (the default) refits every layer in graph order on the pruned
    model's inputs; ``independent`` keeps the weight-SVD bases with least-squares scaling.

    ``reference`` is the cost of the user's original model (the targets are fractions of it),
    ``latency_scale`` the latency of ``prepared`` relative to the original (double pruning);
    A ``final`` stage (not a candidate of double pruning) times every model the quality search
    evaluated and checks the result's speed against the original (:mod:`onnx_basisprune.runtime.speed_check`), as the
    config asks. The result is a new model; ``prepared`` is not changed.
    """
    config = data.config
    criterion, fit = config.allocation, config.fit
    builder = None
    if fit == "sequential":
        targets, stats, builder = data_aware_builder(prepared, data, verbose)
    if criterion == "fisher":
        from ..basis.data_aware import allocation_scores

        scores = allocation_scores(targets, stats.moments, stats.fisher, criterion)
        summary = {"samples": stats.samples, "seconds": round(stats.seconds, 2), "device": stats.device, "loss": stats.loss}
    else:
        measured = measured or basis_importance(prepared, data, verbose)
        prepared = measured.prepared  # the layers with their basis-output moments
        scores = measured.scores(criterion)
        importance = measured.result
        summary = {"samples": importance.samples, "seconds": round(importance.seconds, 2), "device": importance.device,
                   "loss": importance.loss}

    def build(plan: Mapping[str, Decision]) -> dict[str, Decision]:
        return dict(plan) if builder is None else builder.decisions(plan)

    block = ranks.block_size(config.provider)
    prepared, table = _measured_latency(prepared, config, target, block, verbose)
    evaluator = data.evaluator
    sweep: list[SweepPoint] = []
    # The last passing candidate of the search, by plan signature: the search returns it, so it is
    # neither built nor scored again.
    passing: dict[tuple, tuple[Quality, ir.Model]] = {}
    if target.kind == "max-drop":

        def report(p: SweepPoint) -> None:
            print(f"  threshold {p.threshold:.3g}: params {p.params / reference.params:.3f}, MACs {p.macs / reference.macs:.3f}, "
                  f"{evaluator.metric} {p.quality:.4f} ({describe_change(p.drop, p.drop_bound)}) {'ok' if p.passed else 'over'}")

        if verbose:
            print(f"searching the strongest basis pruning whose {evaluator.metric} drop has a {CONFIDENCE:.0%} bound within "
                  f"{target.value:g} pt (original {evaluator.original:.4f} on {evaluator.n} images)")
        search_scores = ranks.per_unit_cost(scores, prepared.layers, "macs") if criterion == "fisher" else scores
        timer = _candidate_timer(evaluator.reference, prepared, config) if final else None

        def measure(p: Mapping[str, Decision]) -> Quality:  # the model as it would be handed over
            model = final_model(prepared, build(p))
            q = evaluator.measure(model, timer)
            if q.within(target.value):
                passing.clear()
                passing[plan_signature(p)] = (q, model)
            return q

        plan, sweep = max_drop_plan(
            prepared.layers, search_scores, block, measure=measure, cost=lambda p: plan_cost(prepared, p),
            max_drop=target.value, progress=report if verbose else None,
        )
    else:
        search_scores = scores
        value = target.value
        if target.kind == "params":
            value *= reference.params / prepared.original.params
        elif target.kind == "macs":
            value *= reference.macs / prepared.original.macs
        else:
            value /= latency_scale
        plan = budget_plan(prepared, scores, block=block, table=table,
                           target_params=value if target.kind == "params" else None,
                           target_macs=value if target.kind == "macs" else None,
                           target_latency=value if target.kind == "latency" else None)
    decisions = build(plan)
    tuning = None
    if builder is not None and config.tune:
        decisions, tuning = tune_decisions(prepared, data, decisions, builder.module, verbose)
    searched = None if tuning else passing.get(plan_signature(plan))
    model = None if searched is None else searched[1]
    speed = None
    if final and config.check_speed and not unsized_inputs(prepared.model, prepared.input_shapes):
        decisions, model, speed = check_speed(
            evaluator.reference, decisions, lambda d: final_model(prepared, d), _savings(prepared, decisions, table),
            config.provider, config.latency_batches, prepared.input_shapes, may_recompose=target.kind in ("max-drop", "latency"),
            progress=verbose, model=model)
        if verbose:
            print(speed.describe())
    result = apply_plan(prepared, decisions, model=model)
    return dataclasses.replace(
        result,
        speed_check=speed,
        original=reference,
        predicted_latency_ratio=None if table is None else latency_scale * predicted_latency_ratio(prepared, plan, table),
        quality=evaluator.summary(result.model, None if searched is None or (speed and speed.recomposed) else searched[0]),
        calibration={**summary, "heldout": evaluator.n, "criterion": criterion, "fit": fit, "tuning": tuning,
                     "source": data.calib.source},
        importance=_importance_summary(scores, plan),
        sweep=sorted(sweep, key=lambda p: p.threshold),
    )


def _measured_latency(prepared: Prepared, config: PruneConfig, target: Target, block: int,
                      verbose: bool) -> tuple[Prepared, LatencyTable | None]:
    """The preparation with break-even ranks measured on the provider, and the timings, when
    ``config.measures_latency``; where timing is impossible and was not asked for explicitly
    (symbolic input size, provider missing), the cost model's ranks with a note."""
    if not config.measures_latency(target):
        return prepared, None
    try:
        return use_measured_latency(prepared, config.provider, block, config.latency_batches)
    except (BasisPruneError, ValueError) as exc:
        if config.latency_aware or target.kind == "latency":
            raise
        if verbose:
            print(f"note: layers not timed ({str(exc).splitlines()[0]}); break-even ranks from the cost model")
        return prepared, None


def _savings(prepared: Prepared, decisions: Mapping[str, Decision], table: LatencyTable | None) -> dict[str, float]:
    """What each split layer saves: measured ms where timed, else cost-model MACs (the speed
    check recomposes the smallest first)."""
    out = {}
    for name, d in decisions.items():
        if d.action != "decomposed":
            continue
        layer = prepared.layers[name]
        if table is not None and name in table.layers:
            out[name] = table.layers[name].original_ms - table.layer_ms(name, d.rank)
        else:
            out[name] = float(layer.macs - layer.split_cost(d.rank))
    return out


def tune_decisions(prepared: Prepared, data: CalibrationData, decisions: Mapping[str, Decision], teacher,
                   verbose: bool = True) -> tuple[dict[str, Decision], dict]:
    """Scaling-factor tuning of the fitted model (Torch): the basis factors and biases that make
    its outputs match the original's on the calibration images; returns the decisions with them
    folded in and a summary for the report."""
    from ..calibration.interpreter import OnnxTorchModule
    from ..calibration.tuning import tune
    from ..basis.data_aware import tuning_sites, with_tuning

    model = rewritten(prepared, decisions)
    sites = tuning_sites(model, decisions)
    if not sites:
        return dict(decisions), {}
    parts: dict[str, list[np.ndarray]] = {}
    for inputs, _ in data.batches():
        for name, array in inputs.items():
            parts.setdefault(name, []).append(array)
    inputs = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    result = tune(OnnxTorchModule(ir.to_proto(model)), teacher, sites, inputs, device=data.config.device or "cpu",
                  seed=data.config.seed, progress=verbose)
    if verbose:
        print(f"tuning: {len(sites)} factor/bias sets, {result.steps} steps, output distance "
              f"{result.loss_before:.4g} -> {result.loss_after:.4g} ({result.seconds:.0f} s)")
    summary = {"parameters": int(sum(site.channels for site in sites)), "steps": result.steps,
               "loss_before": result.loss_before, "loss_after": result.loss_after, "seconds": round(result.seconds, 2)}
    return with_tuning(decisions, result.scales, result.biases), summary


def _candidate_timer(reference: ir.Model, prepared: Prepared, config: PruneConfig):
    """The timer that measures every candidate of the quality search in the session it is scored
    in (``config.time_candidates``; not for a model of symbolic input size)."""
    if not config.time_candidates or unsized_inputs(prepared.model, prepared.input_shapes):
        return None
    from ..runtime.bench import ReferenceTimer

    return ReferenceTimer(reference, prepared.input_shapes)


def _importance_summary(scores: Mapping[str, ranks.LayerScores], plan) -> dict[str, dict]:
    """Per layer: normalised importance range and the share of it the kept bases carry."""
    summary = {}
    for name, s in scores.items():
        decision = plan.get(name)
        kept = s.scores.sum() if decision is None or decision.keep is None else np.take_along_axis(s.scores, decision.keep, axis=1).sum()
        total = s.scores.sum()
        summary[name] = {
            "max": float(s.scores.max()),
            "median": float(np.median(s.scores)),
            "min": float(s.scores.min()),
            "kept_share": float(kept / total) if total > 0 else 1.0,
        }
    return summary
