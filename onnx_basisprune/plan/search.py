"""Quality on held-out data with onnxruntime, and the search for the strongest pruning within
a quality budget (``--max-drop``): bisection over the global importance threshold.

The budget is a statistical promise. Each held-out image is an outcome pair (the original right
or wrong, the candidate right or wrong); the images the candidate loses and gains are the
discordant pairs of McNemar's test, and a candidate passes only when the one-sided 95% upper
confidence bound of its quality drop, Tango's score bound for a paired difference
(:func:`drop_bound`), stays within the budget. The original itself must score clearly above
chance: a reference that chance could match certifies nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ..basis.rewrite import Decision
from ..errors import BasisPruneError
from .bisection import last_passing
from ..runtime.session import new_session
from . import ranks

if TYPE_CHECKING:
    from ..runtime.bench import ReferenceTimer

P = TypeVar("P")
Batches = Callable[[], Iterable[tuple[dict[str, np.ndarray], object]]]

CONFIDENCE = 0.95
_Z = NormalDist().inv_cdf(CONFIDENCE)


def drop_bound(lost: int, gained: int, n: int) -> tuple[float, float]:
    """(estimate, one-sided upper confidence bound) of the quality drop, as fractions, from paired
    outcomes on ``n`` images: ``lost`` the original got right and the candidate wrong, ``gained``
    the reverse.

    The estimate is ``(lost - gained) / n``. The bound is Tango's score bound (Stat. Med. 1998) at
    :data:`CONFIDENCE`: the largest drop ``d`` that the score test, with the other discordant
    probability at its maximum-likelihood value under ``d``, does not reject. Like Wilson's bound
    it stays above 0 when nothing changed (``z^2 / (n + z^2)``), so a small set certifies little.
    """
    if n < 1 or lost < 0 or gained < 0 or lost + gained > n:
        raise ValueError(f"need 0 <= lost + gained <= n, got lost={lost}, gained={gained}, n={n}")
    estimate = (lost - gained) / n
    if lost == n:
        return 1.0, 1.0

    def score(d: float) -> float:  # decreasing in d; 0 at the estimate
        b = -lost - gained + (2 * n - lost + gained) * d
        c = -gained * d * (1 - d)
        p_gain = (-b + math.sqrt(max(b * b - 8 * n * c, 0.0))) / (4 * n)
        variance = n * (2 * p_gain + d * (1 - d))
        return (lost - gained - n * d) / math.sqrt(variance) if variance > 0 else -math.inf

    lo, hi = estimate, 1.0  # score(lo) >= -z > score(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if score(mid) >= -_Z:
            lo = mid
        else:
            hi = mid
    return estimate, hi


def images_to_certify(max_drop: float, lost: int) -> int | None:
    """The fewest held-out images on which a candidate that loses ``lost`` of them (and gains
    none) has its drop bound within ``max_drop`` points; None when no number does."""
    if max_drop <= 0:
        return None

    def fits(n: int) -> bool:
        return 100 * drop_bound(lost, 0, n)[1] <= max_drop

    lo, hi = max(lost, 1) - 1, max(lost, 1)  # lo is too small or does not fit
    while not fits(hi):
        lo, hi = hi, 2 * hi
    return last_passing(lo, hi, lambda n: not fits(n)) + 1


def describe_change(drop: float, drop_bound: float) -> str:
    """A drop (points, positive = lost) as the change it makes and its worst case, e.g.
    ``-0.40 pt, 95% bound -1.02``."""
    return f"{0.0 - drop:+.2f} pt, {CONFIDENCE:.0%} bound {0.0 - drop_bound:+.2f}"


def chance_problem(predictions: np.ndarray, labels: np.ndarray) -> str | None:
    """Why top-1 ``predictions`` are no evidence that ``labels`` are the model's classes (None
    when they are): their accuracy does not beat, at :data:`CONFIDENCE`, answering the most
    frequent label every time (one-sided binomial z-test)."""
    n = len(labels)
    chance = float(np.bincount(labels).max() / n)
    accuracy = float((predictions == labels).mean())
    if accuracy > chance + _Z * math.sqrt(chance * (1 - chance) / n):
        return None
    return (f"the original model's accuracy with these labels, {accuracy:.4f} on {n} images, is at chance level "
            f"({chance:.4f}, always answering the most frequent label) or below")


@dataclass(frozen=True)
class Quality:
    """A candidate's held-out quality (fraction) and its drop from the original's, in points
    (positive: lost): the estimate and the one-sided upper confidence bound."""

    value: float
    drop: float
    drop_bound: float
    latency_ratio: float | None = None  # CPU batch 1, to the original, when timed in the same session

    def within(self, max_drop: float) -> bool:
        return self.drop_bound <= max_drop + 1e-9


@dataclass(frozen=True)
class QualitySummary:
    """The report's held-out quality of a pruned model: ``metric`` (accuracy, agreement, ...) of
    the original and the pruned model on ``n`` samples, the drop in points (positive: lost) and its
    one-sided upper bound at ``confidence``."""

    metric: str
    original: float
    pruned: float
    n: int
    drop: float
    drop_bound: float
    confidence: float


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    params: int
    macs: int
    quality: float
    drop: float  # points, positive = lost (Quality.drop)
    drop_bound: float  # one-sided 95% upper bound of the drop, points
    passed: bool
    latency_ratio: float | None = None  # CPU batch 1, to the original (Quality.latency_ratio)


def model_predictions(model: ir.Model | ort.InferenceSession, batches: Batches) -> np.ndarray:
    """Top-1 class of every sample of ``batches``, with onnxruntime (in ``model`` if it is a session)."""
    sess = model if isinstance(model, ort.InferenceSession) else new_session(model)
    preds = [_argmax(sess.run(None, feeds)[0]) for feeds, _ in batches()]
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def _argmax(logits: np.ndarray) -> np.ndarray:
    if logits.ndim != 2:
        raise BasisPruneError(
            f"the model output has shape {list(logits.shape)}, not class scores (N, C): "
            "use --target-params or --target-macs instead of --max-drop"
        )
    return logits.argmax(axis=1)


class Evaluator:
    """Top-1 accuracy (labeled) or top-1 agreement with the original model (unlabeled), as a
    fraction, on a fixed held-out set streamed in batches (memory does not grow with its size).

    It keeps the original's per-image outcomes, so every candidate is measured as paired outcomes
    against them (:meth:`measure`). Labels with which the original scores at chance level are
    refused (:func:`chance_problem`). ``predictions``: the original's, when already computed.
    """

    def __init__(self, batches: Batches, labels: np.ndarray | None, original: ir.Model,
                 predictions: np.ndarray | None = None):
        self.batches = batches
        self.reference = original  # the user's model: every stage is measured against it
        reference = model_predictions(original, batches) if predictions is None else predictions
        self.n = len(reference)
        if self.n == 0:
            raise BasisPruneError("the held-out set is empty")
        problem = None if labels is None else chance_problem(reference, labels)
        if problem:
            raise BasisPruneError(f"{problem}: the labels are not the model's classes (check --labels or the data, "
                                  "or use --unlabeled)")
        self.metric = "accuracy" if labels is not None else "agreement"
        self.targets = labels if labels is not None else reference
        self.correct = reference == self.targets  # the original's outcome on every image
        self.original = float(self.correct.mean())

    @property
    def bound_floor(self) -> float:
        """The drop bound (points) of a candidate with exactly the original's outcomes: no
        candidate that gains nothing certifies a smaller drop on these images."""
        return 100 * drop_bound(0, 0, self.n)[1]

    def measure(self, model: ir.Model, timer: ReferenceTimer | None = None) -> Quality:
        """Paired outcomes against the original; with a ``timer``, the candidate is scored in the
        timer's session and its latency ratio measured there too (one session for both)."""
        session = None if timer is None else timer.session(model)
        correct = model_predictions(model if session is None else session, self.batches) == self.targets
        lost = int((self.correct & ~correct).sum())
        gained = int((~self.correct & correct).sum())
        drop, bound = drop_bound(lost, gained, self.n)
        return Quality(float(correct.mean()), 100 * drop, 100 * bound, None if session is None else timer.ratio(session))

    def summary(self, model: ir.Model, measured: Quality | None = None) -> QualitySummary:
        """The report's held-out quality of ``model`` (``measured``: already measured on it)."""
        q = measured or self.measure(model)
        return QualitySummary(self.metric, self.original, q.value, self.n, q.drop, q.drop_bound, CONFIDENCE)


def plan_signature(plan: Mapping[str, Decision]) -> tuple:
    """Identifies the model a plan produces (same actions and kept bases -> same model)."""
    return tuple(
        (name, d.action, None if d.keep is None else d.keep.tobytes()) for name, d in sorted(plan.items())
    )


def max_drop_search(
    thresholds: np.ndarray,
    candidate: Callable[[float], P],
    signature: Callable[[P], Hashable],
    measure: Callable[[P], Quality],
    cost: Callable[[P], tuple[int, int]],
    max_drop: float,
    progress: Callable[[SweepPoint], None] | None = None,
) -> tuple[float | None, list[SweepPoint]]:
    """The highest of ``thresholds`` (ascending) whose candidate's held-out drop bound stays
    within ``max_drop`` points (:meth:`Quality.within`).

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
            q = measure(plan)
            params, macs = cost(plan)
            point = SweepPoint(float(thresholds[i]), params, macs, q.value, q.drop, q.drop_bound, q.within(max_drop),
                               q.latency_ratio)
            sweep.append(point)
            if progress:
                progress(point)
            evaluated[key] = point.passed
        return evaluated[key]

    lo, hi = 0, len(thresholds) - 1  # invariant: lo passes
    if not passes(lo):
        return None, sweep
    lo = hi if passes(hi) else last_passing(lo, hi, passes)
    return float(thresholds[lo]), sweep


def max_drop_plan(
    layers: Mapping[str, object],
    scores: Mapping[str, ranks.LayerScores],
    block: int,
    measure: Callable[[dict[str, Decision]], Quality],
    cost: Callable[[dict[str, Decision]], tuple[int, int]],
    max_drop: float,
    progress: Callable[[SweepPoint], None] | None = None,
) -> tuple[dict[str, Decision], list[SweepPoint]]:
    """The basis plan at the highest global importance threshold within ``max_drop`` points (no
    pruning at all when even the lowest threshold fails), and the sweep of evaluated plans."""
    threshold, sweep = max_drop_search(
        ranks.candidate_thresholds(scores),
        lambda t: ranks.threshold_plan(layers, scores, t, block),
        plan_signature, measure, cost, max_drop, progress,
    )
    if threshold is None:
        return ranks.threshold_plan(layers, {}, 0.0, block), sweep
    return ranks.threshold_plan(layers, scores, threshold, block), sweep
