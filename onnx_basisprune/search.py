"""Quality on held-out data with onnxruntime, and the search for the strongest pruning within
a quality budget (``--max-drop``): bisection over the global importance threshold."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from . import ranks
from .errors import BasisPruneError
from .rewrite import Decision

P = TypeVar("P")


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    params: int
    macs: int
    quality: float
    passed: bool
    latency_ratio: float | None = None  # CPU batch 1, to the original; set after the search when benchmarking


def session(model: ir.Model, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


class Evaluator:
    """Top-1 accuracy (labeled) or top-1 agreement with the original model (unlabeled), as a
    fraction, on a fixed held-out set streamed in batches (memory does not grow with its size)."""

    def __init__(self, batches: Callable[[], Iterable[tuple[dict[str, np.ndarray], object]]], labels: np.ndarray | None, original: ir.Model):
        self.batches = batches
        self.reference = original  # the user's model: every stage is measured against it
        reference = self.predictions(original)
        self.n = len(reference)
        if self.n == 0:
            raise BasisPruneError("the held-out set is empty")
        self.metric = "accuracy" if labels is not None else "agreement"
        self.targets = labels if labels is not None else reference
        self.original = self.score_predictions(reference)

    def predictions(self, model: ir.Model) -> np.ndarray:
        sess = session(model)
        preds = [self._argmax(sess.run(None, feeds)[0]) for feeds, _ in self.batches()]
        return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _argmax(logits: np.ndarray) -> np.ndarray:
        if logits.ndim != 2:
            raise BasisPruneError(
                f"the model output has shape {list(logits.shape)}, not class scores (N, C): "
                "use --target-params or --target-macs instead of --max-drop"
            )
        return logits.argmax(axis=1)

    def score_predictions(self, preds: np.ndarray) -> float:
        return float((preds == self.targets).mean())

    def score(self, model: ir.Model) -> float:
        return self.score_predictions(self.predictions(model))


def plan_signature(plan: Mapping[str, Decision]) -> tuple:
    """Identifies the model a plan produces (same actions and kept bases -> same model)."""
    return tuple(
        (name, d.action, None if d.keep is None else d.keep.tobytes()) for name, d in sorted(plan.items())
    )


def max_drop_search(
    thresholds: np.ndarray,
    candidate: Callable[[float], P],
    signature: Callable[[P], Hashable],
    quality: Callable[[P], float],
    cost: Callable[[P], tuple[int, int]],
    floor: float,
    progress: Callable[[SweepPoint], None] | None = None,
) -> tuple[float | None, list[SweepPoint]]:
    """The highest of ``thresholds`` (ascending) whose candidate keeps held-out quality >= ``floor``.

    Quality falls, roughly monotonically, as the threshold rises; bisection finds the boundary
    in log2(len(thresholds)) evaluations, each distinct candidate (by ``signature``) evaluated
    once. Returns the threshold (None when even the lowest fails) and every evaluated point
    (the sweep for the report and figures); the returned threshold always passed.
    """
    sweep: list[SweepPoint] = []
    evaluated: dict[Hashable, bool] = {}  # neighbouring thresholds often give the same model

    def passes(i: int) -> bool:
        plan = candidate(float(thresholds[i]))
        key = signature(plan)
        if key not in evaluated:
            q = quality(plan)
            params, macs = cost(plan)
            point = SweepPoint(float(thresholds[i]), params, macs, q, q >= floor)
            sweep.append(point)
            if progress:
                progress(point)
            evaluated[key] = point.passed
        return evaluated[key]

    lo, hi = 0, len(thresholds) - 1  # invariant: lo passes
    if not passes(lo):
        return None, sweep
    if passes(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return float(thresholds[lo]), sweep


def max_drop_plan(
    layers: Mapping[str, object],
    scores: Mapping[str, ranks.LayerScores],
    block: int,
    quality: Callable[[dict[str, Decision]], float],
    cost: Callable[[dict[str, Decision]], tuple[int, int]],
    floor: float,
    progress: Callable[[SweepPoint], None] | None = None,
) -> tuple[dict[str, Decision], list[SweepPoint]]:
    """The basis plan at the highest global importance threshold within the quality floor (no
    pruning at all when even the lowest threshold fails), and the sweep of evaluated plans."""
    threshold, sweep = max_drop_search(
        ranks.candidate_thresholds(scores),
        lambda t: ranks.threshold_plan(layers, scores, t, block),
        plan_signature, quality, cost, floor, progress,
    )
    if threshold is None:
        return ranks.threshold_plan(layers, {}, 0.0, block), sweep
    return ranks.threshold_plan(layers, scores, threshold, block), sweep
