"""The main job: basis pruning driven by Taylor importance on the user's target-domain data.

decompose at full rank -> load calibration data -> importance of every basis scaling factor
(Torch, :mod:`onnx_basisprune.calibration`) -> choose ranks (target params/MACs, or the strongest
pruning within ``--max-drop`` points of held-out quality) -> rewrite -> report.

This module is the only place on the graph side that reaches the Torch-backed stage, and it
imports it lazily: ``import onnx_basisprune`` never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import ranks
from .api import Prepared, PruneResult, apply_plan, budget_plan, plan_cost, predicted_latency_ratio, prepare, rewritten, use_measured_latency
from .cost import ModelCost
from .errors import BasisPruneError
from .rewrite import META_LAYER, META_ROLE
from .svd import BasisStats
from .search import Evaluator, SweepPoint, max_drop_plan

DEFAULT_CRITERION = "energy"
DEFAULT_MAX_DROP = 1.0


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
        v = np.asarray(values, dtype=np.float64).reshape(groups[name], -1)
        norm = np.linalg.norm(v)
        v = v / norm if norm > 0 else v
        out[name] = ranks.LayerScores(order=np.argsort(-v, axis=1, kind="stable"), scores=v)
    return out


def _preprocess(spec, args: argparse.Namespace):
    from .calibration.data import Preprocess

    pre = Preprocess.default_for(spec)
    overrides = {
        "resize": args.resize,
        "crop": (args.crop, args.crop) if args.crop else None,
        "scale": args.scale,
        "mean": args.mean,
        "std": args.std,
        "bgr": True if args.bgr else None,
    }
    return dataclasses.replace(pre, **{k: v for k, v in overrides.items() if v is not None})


def _load_data(args: argparse.Namespace, proto, num_classes: int | None):
    from .calibration.data import InputSpec, load_calibration

    specs = InputSpec.from_model(proto)
    pre = _preprocess(specs[0], args) if len(specs) == 1 and specs[0].layout in ("NCHW", "NHWC") else None
    if pre is not None:
        print(f"preprocessing: {pre.describe()}")
    calib = load_calibration(args.calib, specs, pre, labels_file=args.labels, num_classes=num_classes, limit=args.limit, seed=args.seed)
    if args.eval:
        heldout = load_calibration(args.eval, specs, pre, labels_file=args.labels, num_classes=num_classes, seed=args.seed)
    else:
        calib, heldout = calib.split(args.holdout, args.seed)
    if len(calib) == 0 or len(heldout) == 0:
        raise BasisPruneError(f"{args.calib}: too few samples to split into importance and held-out parts")
    print(f"calibration: {len(calib)} samples for importance, {len(heldout)} held out ({calib.source})")
    return calib, heldout


@dataclass(frozen=True)
class Target:
    """What the pruning aims at: ``max-drop`` (points of held-out quality), or the fraction of the
    original model's ``params``, ``macs`` or ``latency`` that remains."""

    kind: str
    value: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Target:
        for kind, value in (("params", args.target_params), ("macs", args.target_macs), ("latency", args.target_latency)):
            if value is not None:
                return cls(kind, value)
        max_drop = DEFAULT_MAX_DROP if args.max_drop is None else args.max_drop
        if max_drop < 0:
            raise BasisPruneError(f"--max-drop must be >= 0, got {max_drop}")
        return cls("max-drop", max_drop)


@dataclass
class CalibrationData:
    """What every pruning stage measures with: the importance samples, the held-out evaluator
    (whose reference is the user's original model, whatever stage runs) and the loss."""

    calib: object  # calibration.data.CalibrationSet
    evaluator: Evaluator
    loss: str
    args: argparse.Namespace

    def batches(self):
        return self.calib.batches(self.args.batch_size)

    @property
    def n_batches(self) -> int:
        return -(-len(self.calib) // self.args.batch_size)


def load_calibration_data(prepared: Prepared, args: argparse.Namespace) -> CalibrationData:
    """Load ``--calib`` (and ``--eval``) for the model and set up the held-out evaluator."""
    from .calibration.importance import choose_loss

    out_shape = prepared.shapes.get(prepared.model.graph.outputs[0])
    num_classes = out_shape[1] if out_shape is not None and len(out_shape) == 2 else None
    calib, heldout = _load_data(args, ir.to_proto(prepared.model), num_classes)
    evaluator = Evaluator(lambda: heldout.batches(64), heldout.labels, prepared.model)
    return CalibrationData(calib, evaluator, choose_loss(out_shape or (), calib.labels is not None), args)


def torch_module(model: ir.Model, data: CalibrationData):
    """The model as a Torch module, checked against onnxruntime on the first calibration batch
    (unsupported ops are refused before any work)."""
    from .calibration.interpreter import OnnxTorchModule, check_against_onnxruntime

    proto = ir.to_proto(model)
    module = OnnxTorchModule(proto)
    first_inputs, _ = next(data.calib.batches(min(data.args.batch_size, len(data.calib))))
    check_against_onnxruntime(module, proto, first_inputs)
    return module


def run_main_job(model_path: Path, args: argparse.Namespace, input_shapes: Mapping[str, Sequence[int]] | None) -> PruneResult:
    prepared = prepare(model_path, input_shapes)
    target = Target.from_args(args)
    data = load_calibration_data(prepared, args)
    if args.double:
        from .double import double_prune

        return double_prune(prepared, data, target)
    return basis_stage(prepared, data, target, prepared.original)


@dataclass
class BasisImportance:
    """What the importance pass measured on the decomposed model: Taylor statistics of every
    basis scaling factor and the basis-output moments (also set on the layers, for the
    least-squares scaling)."""

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
    from .calibration.importance import Gate, measure_importance

    args = data.args
    decomposed = rewritten(prepared, ranks.full_rank_plan(prepared.layers))
    module = torch_module(decomposed, data)
    gates = {name: Gate(tensor, axis, prepared.layers[name].groups) for name, (tensor, axis) in basis_gates(decomposed).items()}
    importance = measure_importance(module, gates, data.batches(), loss=data.loss, total=data.n_batches, device=args.device,
                                    seed=args.seed, progress=verbose)
    for name in importance.second:
        prepared.layers[name].stats = BasisStats(importance.second[name], importance.mean[name])
    return BasisImportance(prepared, importance)


def basis_stage(prepared: Prepared, data: CalibrationData, target: Target, reference: ModelCost,
                latency_scale: float = 1.0, verbose: bool = True, time_candidates: bool = True,
                measured: BasisImportance | None = None) -> PruneResult:
    """Basis pruning of ``prepared`` to ``target``: importance of every basis (unless already
    ``measured``), then the plan.

    ``reference`` is the cost of the user's original model (the targets are fractions of it),
    ``latency_scale`` the latency of ``prepared`` relative to the original (double pruning);
    ``time_candidates`` times every model the quality search evaluated (unless ``--no-bench``).
    The result is a new model; ``prepared`` is not changed (but for the layers' moments).
    """
    args = data.args
    measured = measured or basis_importance(prepared, data, verbose)
    importance = measured.result
    criterion = args.criterion or DEFAULT_CRITERION
    scores = measured.scores(criterion)

    block = ranks.block_size(args.provider)
    table = None
    if args.latency_aware or target.kind == "latency":
        table = use_measured_latency(prepared, args.provider, block, args.bench_batch)
    evaluator = data.evaluator
    sweep: list[SweepPoint] = []
    if target.kind == "max-drop":
        floor = evaluator.original - target.value / 100.0

        def report(p: SweepPoint) -> None:
            print(f"  threshold {p.threshold:.3g}: params {p.params / reference.params:.3f}, MACs {p.macs / reference.macs:.3f}, "
                  f"{evaluator.metric} {p.quality:.4f} {'ok' if p.passed else 'too low'}")

        if verbose:
            print(f"searching the strongest basis pruning with {evaluator.metric} >= {floor:.4f} "
                  f"(original {evaluator.original:.4f} - {target.value:g} pt)")
        plan, sweep = max_drop_plan(
            prepared.layers, scores, block,
            quality=lambda p: evaluator.score(rewritten(prepared, p)),
            cost=lambda p: plan_cost(prepared, p),
            floor=floor, progress=report if verbose else None,
        )
    else:
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
    if sweep and time_candidates and not args.no_bench:
        sweep = time_sweep(evaluator.reference, sweep,
                           lambda p: rewritten(prepared, ranks.threshold_plan(prepared.layers, scores, p.threshold, block)),
                           prepared.input_shapes)
    result = apply_plan(prepared, plan)
    result.original = reference
    if table is not None:
        result.extra["predicted_latency_ratio"] = latency_scale * predicted_latency_ratio(prepared, plan, table)
    result.extra.update(
        quality={"metric": evaluator.metric, "original": evaluator.original, "pruned": evaluator.score(result.model), "n": evaluator.n},
        calibration={
            "samples": importance.samples,
            "heldout": evaluator.n,
            "seconds": round(importance.seconds, 2),
            "device": importance.device,
            "loss": importance.loss,
            "criterion": criterion,
            "source": data.calib.source,
        },
        importance=_importance_summary(scores, plan),
        sweep=[dataclasses.asdict(p) for p in sorted(sweep, key=lambda p: p.threshold)],
    )
    return result


SWEEP_TIMING_LIMIT_BYTES = 256 << 20  # above this, timing every candidate needs too much memory


def time_sweep(reference: ir.Model, sweep: Sequence[SweepPoint], build: Callable[[SweepPoint], ir.Model],
               input_shapes: Mapping[str, Sequence[int]] | None) -> list[SweepPoint]:
    """Each evaluated candidate's onnxruntime CPU latency at batch 1, as a ratio to the user's
    original model, all timed alternately in one run (the candidates are rebuilt by ``build``)."""
    from .bench import BenchConfig, benchmark
    from .modelio import tensor_bytes

    if tensor_bytes(reference) * (len(sweep) + 1) > SWEEP_TIMING_LIMIT_BYTES:
        return list(sweep)
    models = [ir.to_proto(reference)] + [ir.to_proto(build(p)) for p in sweep]
    config = BenchConfig(providers=("cpu",), batches=(1,), warmup=5, rounds=20, input_shapes=input_shapes)
    case = benchmark(models, config)
    return [dataclasses.replace(p, latency_ratio=t.ratio) for p, t in zip(sweep, case.cases[0].timings[1:])]


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
