"""Double pruning (the paper's second half): remove whole channels first, then prune bases in
what remains, under one target.

channel analysis (:mod:`onnx_basisprune.channels.analysis`) -> Taylor importance of every channel group on the
calibration data (one gate per group, Torch) -> for each share of the budget given to the
channel stage: remove channels (:mod:`onnx_basisprune.channels.select`, :mod:`onnx_basisprune.channels.rewrite`), then run the
basis stage of :mod:`.calibrated` on the smaller model with the rest of the budget -> keep the
candidate that measures best on the held-out split.

How the budget is divided, by measurement:

* ``--max-drop P``: both stages pass a candidate on the 95% upper bound of its held-out drop
  against the original model (:mod:`onnx_basisprune.plan.search`). The channel stage may let that bound reach
  ``F + share * (P - F)`` points, ``F`` being the bound of a candidate with every outcome of the
  original (the least any candidate that gains nothing can certify); the basis stage then prunes
  within the full ``P``. Shares 0 (no image lost), 1/3 and 2/3 are tried, and bases alone; the
  smallest model wins (mean of its params and MACs fractions).
* ``--target-params F`` / ``--target-macs F`` / ``--target-latency F``: the channel stage keeps
  ``F ** share`` of the params / MACs (MACs as the latency proxy) and the basis stage meets ``F``;
  the same shares are tried, and bases alone; the best held-out quality wins.

Channel removal alone would lose much more than it needs to: every layer whose input changes is
refitted by least squares, in graph order on the inputs the channel-pruned model produces, to
reproduce the original model's output (:mod:`.channel_refit`); with ``--fit independent`` only the
layers that lose input channels are, each from the original model's input moments
(:mod:`onnx_basisprune.channels.refit`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from ..channels.analysis import ChannelAnalysis, analyse_channels
from ..channels.refit import Refit, apply_refits, independent_refits, refittable_consumers
from ..channels.rewrite import remove_channels
from ..channels.select import ChannelScores, family_scores, per_unit_cost, removal_at, removal_for_budget
from ..config import Target
from ..errors import BasisPruneError
from ..plan import ranks
from ..plan.search import Evaluator, Quality, describe_change, max_drop_search
from .calibrated import CalibrationData, basis_stage, torch_module
from .channel_refit import SequentialRefit
from .prepared import Prepared, PruneResult, prepare

SHARES = (0.0, 1 / 3, 2 / 3)
DEFAULT_CHANNEL_CRITERION = "taylor-sq"


REFITS_KEPT = 8  # channel removals whose refits are kept (a search revisits its candidates)


@dataclass
class ChannelStage:
    """The channel analysis of the original model, the normalised importance of its groups and
    ``refit``: the layer refits for a removal, in graph order on the pruned model's inputs
    (``--fit sequential``, :class:`.channel_refit.SequentialRefit`) or each from the original's
    input moments (``--fit independent``, :func:`onnx_basisprune.channels.refit.independent_refits`)."""

    prepared: Prepared
    analysis: ChannelAnalysis
    scores: ChannelScores
    refit: Callable[[np.ndarray], dict[str, Refit]]
    criterion: str
    samples: int
    seconds: float
    _quality: dict[tuple[int, bytes], Quality] = field(default_factory=dict, repr=False)
    _refits: dict[bytes, dict[str, Refit]] = field(default_factory=dict, repr=False)

    def refits(self, removed: np.ndarray) -> dict[str, Refit]:
        """``refit(removed)``; the latest :data:`REFITS_KEPT` are kept."""
        key = removed.tobytes()
        if key not in self._refits:
            while len(self._refits) >= REFITS_KEPT:
                del self._refits[next(iter(self._refits))]
            self._refits[key] = self.refit(removed)
        return self._refits[key]

    def model(self, removed: np.ndarray) -> ir.Model:
        """The original (normalised) model without the groups flagged in ``removed``, the layers
        that lost inputs refitted by least squares."""
        model = remove_channels(self.prepared.model, self.analysis, np.flatnonzero(removed))
        apply_refits(model, self.analysis, removed, self.refits(removed))
        return model

    def cost(self, removed: np.ndarray) -> tuple[int, int]:
        return self.analysis.cost(removed)

    def quality(self, removed: np.ndarray, evaluator: Evaluator) -> Quality:
        """Held-out quality of :meth:`model`, evaluated once per removal (the shares' searches
        visit the same candidates) and printed."""
        key = (id(evaluator), removed.tobytes())
        if key not in self._quality:
            q = self._quality[key] = evaluator.measure(self.model(removed))
            params, macs = self.cost(removed)
            original = self.prepared.original
            print(f"  channels: params {params / original.params:.3f}, MACs {macs / original.macs:.3f}, "
                  f"{evaluator.metric} {q.value:.4f} ({describe_change(q.drop, q.drop_bound)})")
        return self._quality[key]


def channel_stage(prepared: Prepared, data: CalibrationData) -> ChannelStage:
    """Analyse the channel coupling and measure every prunable group's Taylor importance (and,
    for ``--fit independent``, the input moments of the layers to refit)."""
    from ..calibration.importance import ChannelSite, measure_channel_importance

    analysis = analyse_channels(prepared.model, prepared.shapes)
    if not analysis.removable():
        reasons = "; ".join(f"{reason} ({n})" for reason, n in sorted(analysis.reasons().items(), key=lambda kv: -kv[1])[:3])
        raise BasisPruneError(f"--double: no channel group can be removed safely ({reasons})")
    print(f"channels: {len(analysis.removable())} of {len(analysis.groups)} channel groups can be removed")
    module = torch_module(prepared.model, data)
    config = data.config
    criterion = config.channel_criterion or DEFAULT_CHANNEL_CRITERION
    sites = [ChannelSite(site.tensor, site.axis, site.groups) for site in analysis.sites]
    independent = config.fit == "independent"
    consumers = refittable_consumers(prepared.model, analysis, prepared.shapes) if independent else {}
    importance = measure_channel_importance(module, sites, len(analysis.groups), data.batches(), data.pass_settings(),
                                            consumers=list(consumers.values()))
    scores = family_scores(analysis, importance.by_criterion(criterion))
    if independent:
        refit = functools.partial(independent_refits, prepared.model, analysis, moments=importance.moments)
    else:
        refit = SequentialRefit.of(prepared.model, prepared.layers, prepared.shapes, analysis, module, data.fit_batches,
                                   device=config.device, seed=config.seed, progress=config.progress)
    return ChannelStage(prepared, analysis, scores, refit, criterion, importance.samples, importance.seconds)


def channels_within(stage: ChannelStage, data: CalibrationData, max_drop: float, block: int) -> np.ndarray:
    """The strongest channel removal whose held-out drop bound stays within ``max_drop`` points."""
    threshold, _ = max_drop_search(
        stage.scores.thresholds(),
        lambda t: removal_at(stage.analysis, stage.scores, t, block),
        lambda removed: removed.tobytes(),
        lambda removed: stage.quality(removed, data.evaluator),
        stage.cost, max_drop,
    )
    if threshold is None:
        return np.zeros(len(stage.analysis.groups), dtype=bool)
    return removal_at(stage.analysis, stage.scores, threshold, block)


def channels_for_budget(stage: ChannelStage, kind: str, fraction: float, block: int) -> np.ndarray | None:
    """The least channel removal keeping ``fraction`` of the original params (or MACs), groups
    ranked by importance per unit of that cost."""
    index = 0 if kind == "params" else 1
    total = stage.prepared.original.params if index == 0 else stage.prepared.original.macs
    scores = per_unit_cost(stage.analysis, stage.scores, kind)
    return removal_for_budget(stage.analysis, scores, lambda removed: stage.cost(removed)[index], fraction * total, block)


@dataclass
class Candidate:
    share: float | None  # of the budget given to the channel stage; None: no channel stage
    removed: np.ndarray
    result: PruneResult

    @property
    def size(self) -> float:
        """Mean of the params and MACs fractions of the original that remain."""
        r = self.result
        return 0.5 * (r.pruned.params / r.original.params + r.pruned.macs / r.original.macs)

    @property
    def quality(self) -> float:
        return self.result.quality.pruned


def _measured_latency_ratio(original: ir.Model, smaller: ir.Model, provider: str, shapes) -> float:
    from ..runtime.bench import BenchConfig, benchmark

    config = BenchConfig(providers=(provider,), batches=(1,), warmup=5, rounds=20, input_shapes=shapes)
    return benchmark([ir.to_proto(original), ir.to_proto(smaller)], config).cases[0].timings[1].ratio


def double_prune(prepared: Prepared, data: CalibrationData, target: Target, stage: ChannelStage | None = None) -> PruneResult:
    """Channel pruning, then basis pruning, with the budget divided by measurement (``stage``:
    the channel importance already measured on ``prepared``)."""
    provider = data.config.provider
    block = ranks.block_size(provider)
    stage = stage or channel_stage(prepared, data)
    evaluator = data.evaluator
    candidates: list[Candidate] = []
    tried: list[np.ndarray] = []
    none = np.zeros(len(stage.analysis.groups), dtype=bool)
    for share in (None, *SHARES):  # None: bases only, the plain main job
        if share is None:
            removed = none
        elif target.kind == "max-drop":
            floor = evaluator.bound_floor
            removed = channels_within(stage, data, floor + share * (target.value - floor), block)
        else:
            removed = channels_for_budget(stage, "params" if target.kind == "params" else "macs", target.value**share, block)
        if removed is None or any((r == removed).all() for r in tried):
            continue  # out of reach, or a channel removal already tried
        tried.append(removed)
        smaller = prepare(stage.model(removed), prepared.input_shapes) if removed.any() else prepared
        params, macs = stage.cost(removed)
        label = "bases only" if share is None else f"channel share {share:.2g}: channels keep params {params / prepared.original.params:.3f}, MACs {macs / prepared.original.macs:.3f}"
        print(f"double pruning, {label}; pruning bases")
        latency_scale = 1.0
        if target.kind == "latency" and removed.any():
            latency_scale = _measured_latency_ratio(prepared.model, smaller.model, provider, prepared.input_shapes)
        try:
            result = basis_stage(smaller, data, target, prepared.original, latency_scale=latency_scale, verbose=False,
                                 final=False)
        except BasisPruneError as exc:  # e.g. a target the smaller model cannot reach with bases
            print(f"  skipped: {exc}")
            continue
        candidate = Candidate(share, removed, result)
        candidates.append(candidate)
        q = result.quality
        print(f"  -> params {result.pruned.params / result.original.params:.3f}, MACs {result.pruned.macs / result.original.macs:.3f}, "
              f"{evaluator.metric} {candidate.quality:.4f} ({describe_change(q.drop, q.drop_bound)})")
    if not candidates:
        raise BasisPruneError(f"--double: no split of the budget reaches target {target.kind} {target.value:g}")
    if target.kind == "max-drop":
        best = min(candidates, key=lambda c: (c.size, -c.quality))
    else:
        best = max(candidates, key=lambda c: (c.quality, -c.size))
    return replace(best.result, double={
        "channel_criterion": stage.criterion,
        "channel_calibration": {"samples": stage.samples, "seconds": round(stage.seconds, 2)},
        "chosen_share": best.share,
        "candidates": [
            {"share": c.share, "channel_groups_removed": int(c.removed.sum()),
             "params": c.result.pruned.params, "macs": c.result.pruned.macs, "quality": c.quality}
            for c in candidates
        ],
        "unprunable": stage.analysis.reasons(),
    }, channels=channel_report(stage.analysis, best.removed))


def channel_report(analysis: ChannelAnalysis, removed: np.ndarray) -> list[dict]:
    """Per Conv/Gemm/MatMul: output and input channels before and after the channel stage."""
    def kept(groups: np.ndarray) -> int:
        groups = np.asarray(groups)
        return int(((groups < 0) | ~removed[np.maximum(groups, 0)]).sum())

    rows = []
    for name, (out_groups, in_groups) in analysis.layer_channels().items():
        rows.append({"name": name, "out": [len(out_groups), kept(out_groups)], "in": [len(in_groups), kept(in_groups)]})
    return rows

