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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import ranks
from .api import Prepared, PruneResult, apply_plan, budget_plan, plan_cost, predicted_latency_ratio, prepare, rewritten, use_measured_latency
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


def run_main_job(model_path: Path, args: argparse.Namespace, input_shapes: Mapping[str, Sequence[int]] | None) -> PruneResult:
    from .calibration.importance import Gate, choose_loss, measure_importance
    from .calibration.interpreter import OnnxTorchModule, check_against_onnxruntime

    prepared = prepare(model_path, input_shapes)
    decomposed = rewritten(prepared, ranks.full_rank_plan(prepared.layers))
    proto = ir.to_proto(decomposed)
    module = OnnxTorchModule(proto)  # refuses unsupported ops before any work
    output = prepared.model.graph.outputs[0]
    out_shape = prepared.shapes.get(output)
    num_classes = out_shape[1] if out_shape is not None and len(out_shape) == 2 else None
    calib, heldout = _load_data(args, proto, num_classes)
    first_inputs, _ = next(calib.batches(min(args.batch_size, len(calib))))
    check_against_onnxruntime(module, proto, first_inputs)

    loss = choose_loss(out_shape or (), calib.labels is not None)
    criterion = args.criterion or DEFAULT_CRITERION
    gates = {name: Gate(tensor, axis, prepared.layers[name].groups) for name, (tensor, axis) in basis_gates(decomposed).items()}
    n_batches = -(-len(calib) // args.batch_size)
    importance = measure_importance(module, gates, calib.batches(args.batch_size), loss=loss, total=n_batches, device=args.device, seed=args.seed)
    for name in importance.second:
        prepared.layers[name].stats = BasisStats(importance.second[name], importance.mean[name])
    if criterion == "energy":
        scores = {name: ranks.output_energy_scores(prepared.layers[name]) for name in importance.second}
    else:
        groups = {name: prepared.layers[name].groups for name in gates}
        scores = layer_scores(importance.by_criterion(criterion), groups)

    block = ranks.block_size(args.provider)
    table = None
    if args.latency_aware or args.target_latency is not None:
        table = use_measured_latency(prepared, args.provider, block)
    evaluator = Evaluator(lambda: heldout.batches(64), heldout.labels, prepared.model)
    sweep: list[SweepPoint] = []
    if args.target_params is not None or args.target_macs is not None or args.target_latency is not None:
        plan = budget_plan(prepared, scores, target_params=args.target_params, target_macs=args.target_macs, block=block,
                           target_latency=args.target_latency, table=table)
    else:
        max_drop = DEFAULT_MAX_DROP if args.max_drop is None else args.max_drop
        if max_drop < 0:
            raise BasisPruneError(f"--max-drop must be >= 0, got {max_drop}")
        floor = evaluator.original - max_drop / 100.0

        def report(p: SweepPoint) -> None:
            print(f"  threshold {p.threshold:.3g}: params {p.params / prepared.original.params:.3f}, MACs {p.macs / prepared.original.macs:.3f}, {evaluator.metric} {p.quality:.4f} {'ok' if p.passed else 'too low'}")

        print(f"searching the strongest pruning with {evaluator.metric} >= {floor:.4f} (original {evaluator.original:.4f} - {max_drop:g} pt)")
        plan, sweep = max_drop_plan(
            prepared.layers, scores, block,
            quality=lambda p: evaluator.score(rewritten(prepared, p)),
            cost=lambda p: plan_cost(prepared, p),
            floor=floor, progress=report,
        )
    if sweep and not args.no_bench:
        sweep = time_sweep(prepared, sweep, lambda p: ranks.threshold_plan(prepared.layers, scores, p.threshold, block))
    result = apply_plan(prepared, plan, in_place=True)
    if table is not None:
        result.extra["predicted_latency_ratio"] = predicted_latency_ratio(prepared, plan, table)
    result.extra.update(
        quality={"metric": evaluator.metric, "original": evaluator.original, "pruned": evaluator.score(result.model), "n": evaluator.n},
        calibration={
            "samples": importance.samples,
            "heldout": evaluator.n,
            "seconds": round(importance.seconds, 2),
            "device": importance.device,
            "loss": importance.loss,
            "criterion": criterion,
            "source": calib.source,
        },
        importance=_importance_summary(scores, plan),
        sweep=[dataclasses.asdict(p) for p in sorted(sweep, key=lambda p: p.threshold)],
    )
    return result


SWEEP_TIMING_LIMIT_BYTES = 256 << 20  # above this, timing every candidate needs too much memory


def time_sweep(prepared: Prepared, sweep: Sequence[SweepPoint], plan_of: Callable[[SweepPoint], Mapping]) -> list[SweepPoint]:
    """Each evaluated candidate's onnxruntime CPU latency at batch 1, as a ratio to the original
    model, timed alternately with it in one run (the candidates are rebuilt from their plans)."""
    from .bench import BenchConfig, benchmark
    from .modelio import tensor_bytes

    if tensor_bytes(prepared.model) * (len(sweep) + 1) > SWEEP_TIMING_LIMIT_BYTES:
        return list(sweep)
    models = [ir.to_proto(prepared.model)] + [ir.to_proto(rewritten(prepared, plan_of(p))) for p in sweep]
    config = BenchConfig(providers=("cpu",), batches=(1,), warmup=5, rounds=20, input_shapes=prepared.input_shapes)
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
