"""Channel coupling on ONNX graphs: which channels of which tensors must be removed together.

Every channel of every activation tensor (one position along its channel axis) is an *element*.
Ops couple elements; a connected component is a :class:`ChannelGroup`, and removing a group removes
all its elements in every tensor (the idea of Torch-Pruning's dependency graph, on ONNX values):

- a Conv/Gemm/MatMul output channel is a new element (a *producer* row), coupled with the matching
  input channel (column, or block of flattened features) of every *consumer* it reaches;
- per-channel ops (activations, BatchNormalization, pooling, Resize, Pad on spatial axes, Cast,
  Mul/Add/... by scalar or per-channel constants, depthwise Conv) map element c to element c;
- elementwise ops of several activations (residual Add, SE gate Mul, SiLU) couple all operands;
- Concat/Split/Slice on the channel axis map elements by offsets, Pad on the channel axis adds
  constant elements, Flatten/Reshape/Squeeze/Unsqueeze map a channel to its block of features.

Whatever cannot be proved safe marks its whole group unprunable, with the reason: graph inputs
and outputs, unsupported ops, unmappable reshapes, grouped (non-depthwise) Conv, MatMul of two
activations, channel counts read by a shape computation, groups no compute node produces.

The analysis also chooses *gate sites*: tensors where a 0/1 mask per channel can be multiplied in
so that removing the groups whose gates are 0 gives exactly the gated model's outputs (producer
outputs, plus the outputs of ops that map 0 to something else before a consumer, such as an
unfolded BatchNormalization or a depthwise Conv with bias). :meth:`ChannelAnalysis.cost` gives
the exact params/MACs after a removal without rewriting the graph; the rewrite itself is
:mod:`onnx_basisprune.channels.rewrite`.

The work is split the way Torch-Pruning splits its dependency graph: the graph walk
(:mod:`.walk`) visits the nodes in order and asks the op table (:data:`.ops.OPS`, one handler per
op type) what each op couples, tracking the values of shape subgraphs (:mod:`.shape_values`);
this module turns the coupling edges into groups (connected components, with scipy), then the
cost model (:mod:`.cost`) and the gate sites (:mod:`.sites`) are derived from the walk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..io.shapes import ShapeTable
from .cost import Plan, build_plan
from .ops import OPS
from .sites import GateSite, choose_sites
from .walk import Walker


# ---------------------------------------------------------------------------------------------
# Public records


@dataclass
class ChannelGroup:
    """Elements that are removed together."""

    index: int
    elements: dict[str, list[int]]  # tensor name -> its channel indices in this group
    producers: list[str]  # Conv/Gemm/MatMul nodes whose output channels (rows) are in the group
    consumers: list[str]  # Conv/Gemm/MatMul nodes whose input channels (columns) are in the group
    prunable: bool
    reason: str | None  # why not, when not
    depthwise: list[str] = field(default_factory=list)  # depthwise Conv whose filters go with it


@dataclass
class ChannelAnalysis:
    groups: list[ChannelGroup]
    sites: list[GateSite]
    plan: Plan = field(repr=False, compare=False)

    def removable(self) -> list[int]:
        """Indices of the prunable groups."""
        return [int(i) for i in np.flatnonzero(self.plan.prunable)]

    def cost(self, removed: np.ndarray) -> tuple[int, int]:
        """Exact (params, MACs at batch 1) of the whole model after removing the groups flagged
        in ``removed`` (bool, one per group), as onnx_basisprune.io.cost measures the rewritten model."""
        return self.plan.cost(self.plan.check_removed(removed))

    def layer_channels(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per Conv/Gemm/MatMul node: (group of each output channel, group of each input channel
        or flattened input feature); -1 where unprunable."""
        plan = self.plan
        return {name: (plan.public_groups(out), plan.public_groups(inp)) for name, (out, inp) in plan.layers.items()}

    def removed_mask(self, groups: Iterable[int]) -> np.ndarray:
        """The bool array of :meth:`cost` flagging ``groups``."""
        mask = np.zeros(len(self.groups), dtype=bool)
        mask[list(groups)] = True
        return self.plan.check_removed(mask)

    def emptied(self, removed: np.ndarray) -> list[str]:
        """Tensors that removing the groups flagged in ``removed`` would leave without any channel
        (such a removal is refused by the rewrite)."""
        plan = self.plan
        kept = plan.kept_counts(plan.check_removed(removed))[:-1]
        return [name for name, k in zip(plan.tensors, kept) if k == 0]

    def reasons(self) -> dict[str, int]:
        """How many groups are unprunable for each reason."""
        counts: dict[str, int] = {}
        for group in self.groups:
            if not group.prunable:
                counts[group.reason] = counts.get(group.reason, 0) + 1
        return counts


def analyse_channels(model: ir.Model, shapes: ShapeTable) -> ChannelAnalysis:
    """Channel groups, gate sites and the cost model of a normalised model (which is not modified)."""
    walk = Walker(model, shapes, OPS.get)
    walk.run()
    return _finish(walk)


# ---------------------------------------------------------------------------------------------
# Groups from the walk


def _finish(walk: Walker) -> ChannelAnalysis:
    """Groups (connected components of the coupling edges), their reasons, the cost model and sites."""
    n = walk.n
    labels = _components(n, walk.edges)
    roots, element_group = np.unique(labels, return_inverse=True)
    element_group = element_group.reshape(-1)
    n_groups = len(roots)
    reason: list[str | None] = [None] * n_groups
    for ids, why in walk.bad:
        for g in np.unique(element_group[ids]):
            if reason[g] is None:
                reason[g] = why
    has_producer = np.zeros(n_groups, dtype=bool)
    for _, name in walk.producer_rows:
        has_producer[element_group[walk.tensors[name].ids]] = True
    for g in np.flatnonzero(~has_producer):
        if reason[g] is None:
            reason[g] = "no Conv/Gemm/MatMul produces these channels"
    prunable = np.array([r is None for r in reason], dtype=bool)
    plan = build_plan(walk, element_group, prunable)
    sites = choose_sites(walk, plan)
    groups = _groups(walk, element_group, prunable, reason)
    return ChannelAnalysis(groups, sites, plan)


def _groups(walk: Walker, element_group: np.ndarray, prunable: np.ndarray, reason: list[str | None]) -> list[ChannelGroup]:
    n_groups = len(prunable)
    elements: list[dict[str, list[int]]] = [{} for _ in range(n_groups)]
    for t in walk.tensors.values():
        g = element_group[t.offset : t.offset + t.size]
        if len(np.unique(g)) == len(g):
            for i, gi in enumerate(g.tolist()):
                elements[gi][t.name] = [i]
            continue
        order = np.argsort(g, kind="stable")
        bounds = np.flatnonzero(np.diff(g[order])) + 1
        for chunk in np.split(order, bounds):
            elements[int(g[chunk[0]])][t.name] = chunk.tolist()
    producers: list[list[str]] = [[] for _ in range(n_groups)]
    consumers: list[list[str]] = [[] for _ in range(n_groups)]
    depthwise: list[list[str]] = [[] for _ in range(n_groups)]
    records = ((walk.producer_rows, producers), (walk.consumer_cols, consumers), (walk.depthwise, depthwise))
    for rows, lists in records:
        for node, name in rows:
            for g in np.unique(element_group[walk.tensors[name].ids]):
                lists[g].append(node)
    return [
        ChannelGroup(int(g), elements[g], producers[g], consumers[g], bool(prunable[g]), reason[g], depthwise[g])
        for g in range(n_groups)
    ]


def _components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected-component labels of the coupling graph: the smallest element id of each component."""
    if not edges:
        return np.arange(n, dtype=np.int64)
    u = np.concatenate([a for a, _ in edges])
    v = np.concatenate([b for _, b in edges])
    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n, dtype=np.int64))
    return smallest[labels]
