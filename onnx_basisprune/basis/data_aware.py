"""Data-aware basis pruning: ranks allocated by loss-weighted output error, every layer refitted
in graph order on the inputs the pruned model produces.

1. *Statistics* (one Torch pass over the calibration data, forward and backward, on the original
   model): per layer the moments of its input and the Fisher weight of each output channel.
2. *Allocation*: per layer the spectrum of the data-aware split (:func:`.reconstruct.fit_layer`
   on the original inputs). With ``criterion="fisher"`` the output error is weighted by the
   Fisher weights, so each squared singular value estimates the loss increase of dropping that
   basis and one global threshold compares layers directly; ``"energy"`` leaves the error
   unweighted and normalises it per layer (share of the layer's output variance).
3. *Sequential fit* (per candidate plan): the layers are refitted in graph order
   (:func:`onnx_basisprune.calibration.reconstruction.sequential_fit`), a pruned layer at its
   planned rank, every other layer whose input changed at full rank; the plan's decisions then
   carry the fitted factors to the rewrite.

Layers cut to a rank above their break-even (``recomposed`` by the cost model) are kept whole and
refitted instead: one node at a lower rank saves nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from ..channels.refit import ConsumerInput, consumer_input
from ..errors import BasisPruneError
from ..plan import ranks
from ..plan.search import plan_signature
from .layers import Layer, constant_array, node_weight
from .reconstruct import Factors, InputMoments, error_spectrum, fit_layer
from .rewrite import Decision, node_weight_layout
from .svd import top_keep

CRITERIA = ("fisher", "energy")
FISHER_FLOOR = 1e-3  # every output channel keeps this share of its layer's mean Fisher weight


@dataclass(frozen=True)
class LayerTarget:
    """What a layer computed in the original model: ``y = W x + b``, ``W`` per group
    (groups, out_g, d); ``bias`` (C_out,) or None when the layer takes no bias (MatMul);
    ``branch``: the tensor its output alone is added to (:func:`added_branch`), else None."""

    layer: Layer
    node: ir.Node
    read: ConsumerInput
    weight: np.ndarray
    bias: np.ndarray | None
    branch: str | None = None

    def site(self):
        """Where the Torch passes find the layer (``calibration.reconstruction.LayerSite``)."""
        from ..calibration.reconstruction import LayerSite

        return LayerSite(self.read, self.node.outputs[0].name, 1 if self.layer.op == "Conv" else -1, self.branch)

    def node_inputs(self, factors: Factors) -> tuple[np.ndarray, np.ndarray | None]:
        """The recomposed factors as the node's (weight, bias) inputs under its own alpha/beta."""
        return self.as_node_inputs(factors.weight(), factors.bias)

    def as_node_inputs(self, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """A map like :attr:`weight` (groups, out_g, d) and a bias (C_out,) or None as the node's
        (weight, bias) inputs under its own alpha/beta."""
        attrs = self.node.attributes
        alpha = attrs.get_float("alpha", 1.0) if self.layer.op == "Gemm" else 1.0
        beta = attrs.get_float("beta", 1.0) if self.layer.op == "Gemm" else 1.0
        return node_weight_layout(self.layer, self.node, weight) / alpha, None if bias is None else bias / beta


def _bias(node: ir.Node, layer: Layer) -> tuple[bool, np.ndarray | None]:
    """(fittable, bias as (C_out,) or None): Conv and Gemm take a fitted bias (a missing one is
    created), MatMul none; a Gemm C that is not one value per output is not fittable."""
    if layer.op == "MatMul":
        return True, None
    c = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    has_input = len(node.inputs) > 2 and node.inputs[2] is not None
    if has_input and c is None:
        return False, None
    if layer.op == "Gemm":
        beta = node.attributes.get_float("beta", 1.0)
        if beta == 0 or (c is not None and c.size not in (1, layer.out_channels)):
            return False, None
        c = None if c is None else beta * np.broadcast_to(c.reshape(-1), (layer.out_channels,))
    return True, np.zeros(layer.out_channels) if c is None else c.astype(np.float64).reshape(-1)


def added_branch(node: ir.Node, shapes) -> str | None:
    """The tensor ``node``'s output is added to when its only use is an ``Add`` of two tensors of
    the output's shape (the last layer of a residual branch; the other input is the shortcut),
    else None."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add" or len(uses[0].node.inputs) != 2:
        return None
    other = uses[0].node.inputs[1 - uses[0].idx]
    if other is None or other is out or constant_array(other) is not None:
        return None
    shape = shapes.get(out)
    return other.name if shape is not None and shapes.get(other) == shape else None


def layer_targets(model: ir.Model, layers: Mapping[str, Layer], shapes) -> dict[str, LayerTarget]:
    """Every layer (splittable, or skipped but with a constant float weight, e.g. depthwise) that
    the sequential fit can refit: 2-D Conv, Gemm, MatMul."""
    targets = {}
    for node in model.graph:
        layer = layers.get(node.name)
        if layer is None:
            continue
        read = consumer_input(node, shapes)
        weight = node_weight(node) if read is not None else None
        if weight is None or weight.dtype.kind != "f" or layer.groups == 0:
            continue
        fittable, bias = _bias(node, layer)
        if fittable:
            targets[node.name] = LayerTarget(layer, node, read, layer.weight_matrices(weight.astype(np.float64)), bias,
                                             added_branch(node, shapes))
    return targets


def channel_weights(fisher: np.ndarray, out_channels: int) -> np.ndarray:
    """Positive per-output weights from a layer's Fisher weights (all 1 when it has none)."""
    f = np.asarray(fisher, dtype=np.float64)
    if f.shape != (out_channels,) or not np.isfinite(f).all() or f.max() <= 0:
        return np.ones(out_channels)
    return f + FISHER_FLOOR * f.mean()


def allocation_scores(targets: Mapping[str, LayerTarget], moments: Mapping[str, InputMoments],
                      fisher: Mapping[str, np.ndarray], criterion: str) -> dict[str, ranks.LayerScores]:
    """Per splittable layer, the error each data-aware basis carries (most first): Fisher-weighted
    and absolute (``fisher``), or unweighted as a share of the layer's total (``energy``)."""
    if criterion not in CRITERIA:
        raise BasisPruneError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    scores = {}
    for name, t in targets.items():
        if t.layer.skip_reason is not None:
            continue
        weights = channel_weights(fisher[name], t.layer.out_channels) if criterion == "fisher" else None
        spectrum = error_spectrum(t.weight, moments[name], t.bias is not None, weights)
        if criterion == "energy":
            total = spectrum.sum(axis=1, keepdims=True)
            spectrum = spectrum / np.where(total > 0, total, 1.0)
        order = top_keep(spectrum.shape[0], spectrum.shape[1])
        scores[name] = ranks.LayerScores(order=order, scores=spectrum)
    return scores


def fit_ranks(targets: Mapping[str, LayerTarget], plan: Mapping[str, Decision]) -> dict[str, int]:
    """The rank each layer is fitted at: its planned rank when split, else its full rank."""
    out = {}
    for name, t in targets.items():
        decision = plan.get(name)
        split = decision is not None and decision.action == "decomposed"
        out[name] = decision.rank if split else min(t.weight.shape[1], t.weight.shape[2])
    return out


def with_factors(plan: Mapping[str, Decision], factors: Mapping[str, Factors]) -> dict[str, Decision]:
    """The plan's decisions carrying the fitted factors. A ``recomposed`` layer is kept whole:
    refitted at full rank when its input changed, else left as it is (its original weights are
    then the best fit; recomposing it at the cut rank would lose accuracy and save nothing)."""
    out = {name: Decision("kept", f"{d.reason}: kept whole") if d.action == "recomposed" else d for name, d in plan.items()}
    for name, f in factors.items():
        decision = out.get(name) or Decision("kept", "not selected")
        reason = decision.reason if decision.action == "decomposed" else f"{decision.reason}; refitted to the pruned inputs"
        out[name] = replace(decision, reason=reason, factors=f,
                            keep=None if decision.action != "decomposed" else top_keep(f.basis.shape[0], f.rank))
    return out


class SequentialBuilder:
    """Builds the decisions of a plan with every layer refitted in graph order (Torch), once per
    distinct plan."""

    def __init__(self, module, targets: Mapping[str, LayerTarget], fisher: Mapping[str, np.ndarray], batches,
                 device: str | None, seed: int, progress: bool):
        self.module = module
        self.targets = dict(targets)
        self.weights = {name: channel_weights(fisher[name], t.layer.out_channels) for name, t in targets.items()}
        self.sites = {name: t.site() for name, t in targets.items()}
        self.batches = batches
        self.device, self.seed, self.progress = device, seed, progress
        self._cache: dict[tuple, dict[str, Decision]] = {}

    def decisions(self, plan: Mapping[str, Decision]) -> dict[str, Decision]:
        key = plan_signature(plan)
        if key not in self._cache:
            self._cache[key] = with_factors(plan, self._fit(plan))
        return self._cache[key]

    def _fit(self, plan: Mapping[str, Decision]) -> dict[str, Factors]:
        from ..calibration.reconstruction import sequential_fit

        rank_of = fit_ranks(self.targets, plan)
        cut = frozenset(name for name, d in plan.items() if name in self.targets and d.action == "decomposed")
        fitted: dict[str, Factors] = {}

        def fit(name: str, moments: InputMoments) -> tuple[np.ndarray, np.ndarray | None]:
            t = self.targets[name]
            fitted[name] = fit_layer(t.weight, t.bias, moments, rank_of[name], self.weights[name])
            return t.node_inputs(fitted[name])

        sequential_fit(self.module, self.sites, fit, self.batches(), refit_unchanged=cut, device=self.device,
                       seed=self.seed, progress=self.progress)
        return fitted


def tuning_sites(model: ir.Model, decisions: Mapping[str, Decision]) -> list:
    """Where scaling-factor tuning acts in the rewritten ``model``: a factor on every basis output
    channel of a split layer, a bias on every output channel of a layer with fitted factors
    (none for MatMul, which has no bias)."""
    from ..calibration.tuning import TuningSite

    by_name = {node.name: node for node in model.graph}
    sites = []
    for name, decision in decisions.items():
        f = decision.factors
        if f is None:
            continue
        axis = 1 if by_name.get(name, by_name.get(f"{name}.scaling")).op_type == "Conv" else -1
        split = decision.action == "decomposed"
        if split:
            sites.append(TuningSite(name, by_name[f"{name}.basis"].outputs[0].name, axis, f.basis.shape[0] * f.rank, "scale"))
        if f.bias is not None:
            out = by_name[f"{name}.scaling" if split else name].outputs[0].name
            sites.append(TuningSite(name, out, axis, len(f.bias), "bias"))
    return sites


def with_tuning(decisions: Mapping[str, Decision], scales: Mapping[str, np.ndarray],
                biases: Mapping[str, np.ndarray]) -> dict[str, Decision]:
    """The decisions with the tuned factors folded in: each basis's factor into its scaling
    column, each bias change into the fitted bias."""
    out = dict(decisions)
    for name, decision in decisions.items():
        f = decision.factors
        if f is None or (name not in scales and name not in biases):
            continue
        scaling = f.scaling
        if name in scales:
            scaling = scaling * scales[name].reshape(f.basis.shape[0], 1, f.rank)
        bias = f.bias if name not in biases else f.bias + biases[name]
        out[name] = replace(decision, factors=replace(f, scaling=scaling, bias=bias))
    return out
