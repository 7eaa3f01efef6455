"""Exact channel removal, and the gated model it must agree with.

:class:`RemoveChannelsPass` removes the elements of the chosen channel groups everywhere in the
normalised model the :class:`~onnx_basisprune.channels.analysis.ChannelAnalysis` was made from (or a copy
of it): weight rows and columns, biases, per-channel constants, depthwise filters and their
``group``, Split sizes, Slice bounds, Pad amounts, Reshape targets, Resize sizes and value shapes.
:func:`gated_model` multiplies a per-channel mask into every gate site instead; with the masks of
the removed groups at 0 both give the same outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from .analysis import ChannelAnalysis
from .cost import constant_key

__all__ = ["RemoveChannelsPass", "gated_model", "remove_channels"]


def _unique_name(taken: set[str], base: str) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _taken_names(graph: ir.Graph) -> set[str]:
    return {v.name for v in graph.inputs} | set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {
        n.name for n in graph
    }


def _initializer(graph: ir.Graph, taken: set[str], base: str, array: np.ndarray) -> ir.Value:
    name = _unique_name(taken, base)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


class RemoveChannelsPass(ir.passes.InPlacePass):
    """Remove the channel groups ``removed`` (indices into ``analysis.groups``) from the model.

    The model must be the normalised model the analysis was made from, or a copy of it (nodes,
    values and initializers are found by name); once rewritten, the analysis no longer describes
    it. Edited initializers keep their names, except where uses of a shared one now differ.
    Raises ValueError for an unprunable group, and for a removal that would leave a tensor
    without channels (see :meth:`ChannelAnalysis.emptied`).
    """

    def __init__(self, analysis: ChannelAnalysis, removed: Iterable[int]):
        super().__init__()
        self.analysis = analysis
        self.removed = analysis.removed_mask(removed)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.analysis.plan
        if not self.removed.any():
            return ir.passes.PassResult(model, False)
        kept = plan.kept(self.removed)
        empty = [name for name in plan.tensors if kept.count(name) == 0]
        if empty:
            raise ValueError(f"removing these groups leaves no channel in {len(empty)} tensors, e.g. '{empty[0]}'")
        graph = model.graph
        nodes = {node.name: node for node in graph}
        values = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
        missing = [name for name in plan.tensors if name not in values]
        if missing:
            raise ValueError(f"the model is not the one analysed: no value '{missing[0]}'")
        self._constants(graph, nodes, plan.new_constants(kept))
        for edit in plan.attr_edits:
            node = nodes[edit.node]
            for name, attr in edit.fn(kept).items():
                if attr is None:
                    node.attributes.pop(name, None)
                else:
                    node.attributes[name] = attr
        for name, t in plan.tensors.items():
            value = values[name]
            if value.shape is not None and t.axis < len(value.shape) and isinstance(value.shape[t.axis], int):
                dims = list(value.shape)
                dims[t.axis] = kept.count(name)
                value.shape = ir.Shape(dims)
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _constants(graph: ir.Graph, nodes: dict[str, ir.Node], constants: dict) -> None:
        """Install the edited constants: in place when an initializer has one new value for all its
        uses, as new initializers where uses differ (the same arrays the cost model counted)."""
        taken = _taken_names(graph)
        for key, (edits, arrays) in constants.items():
            changed = [(edit, array) for edit, array in edits if array is not None]
            if not changed:
                continue
            if key.startswith("<new>"):
                (edit, array), = changed
                node = nodes[edit.node]
                value = _initializer(graph, taken, f"{node.name}.input{edit.index}", array)
                if len(node.inputs) <= edit.index:
                    node.resize_inputs(edit.index + 1)
                node.replace_input_with(edit.index, value)
                continue
            init = graph.initializers[key]
            if len(arrays) == 1:
                array = arrays[0]
                init.const_value = ir.tensor(array, name=key)
                init.shape = ir.Shape(array.shape)
                continue
            original = init.const_value.numpy()
            made: dict[tuple, ir.Value] = {constant_key(original): init}
            for edit, array in changed:
                k = constant_key(array)
                if k not in made:
                    made[k] = _initializer(graph, taken, f"{key}.pruned", array)
                nodes[edit.node].replace_input_with(edit.index, made[k])
            if not init.uses() and not init.is_graph_output():
                del graph.initializers[key]


def remove_channels(model: ir.Model, analysis: ChannelAnalysis, removed: Iterable[int]) -> ir.Model:
    """A copy of ``model`` with the groups ``removed`` taken out (``model`` is not modified)."""
    copy = model.clone()
    RemoveChannelsPass(analysis, removed)(copy)
    return copy


def gated_model(model: ir.Model, analysis: ChannelAnalysis, masks: Mapping[int, float] | np.ndarray) -> ir.Model:
    """A copy of ``model`` with ``Mul(tensor, mask)`` after every gate site, the mask holding per
    channel the value of its group (``masks[group]``; 1 for unprunable channels and for groups
    a mapping leaves out)."""
    n = len(analysis.groups)
    if isinstance(masks, Mapping):
        values = np.ones(n)
        for g, v in masks.items():
            values[int(g)] = v
    else:
        values = np.asarray(masks, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"masks has shape {values.shape}, expected ({n},)")
    copy = model.clone()
    graph = copy.graph
    taken = _taken_names(graph)
    producers = {v.name: (v, n) for n in graph for v in n.outputs}
    plan = analysis.plan
    for site in analysis.sites:
        value, producer = producers[site.tensor]
        if value.is_graph_output():
            raise ValueError(f"gate site '{site.tensor}' is a graph output")
        t = plan.tensors[site.tensor]
        mask = np.where(site.groups >= 0, values[np.maximum(site.groups, 0)], 1.0)
        dtype = (t.dtype or ir.DataType.FLOAT).numpy()
        mask = mask.astype(dtype).reshape((-1,) + (1,) * (t.rank - 1 - t.axis))
        mask_value = _initializer(graph, taken, f"{site.tensor}.gate", mask)
        uses = list(value.uses())
        mul = ir.Node("", "Mul", [value, mask_value], name=_unique_name(taken, f"{site.tensor}.gate_mul"))
        gated = mul.outputs[0]
        gated.name = _unique_name(taken, f"{site.tensor}.gated")
        gated.shape = None if value.shape is None else ir.Shape(list(value.shape))
        gated.type = value.type
        graph.insert_after(producer, mul)
        for user, index in uses:
            user.replace_input_with(index, gated)
    common.TopologicalSortPass()(copy)
    return copy
