"""Least-squares refit of the layers whose input changes when channels are removed.

Removing a channel takes its contribution away from every layer that reads it. Without weight
fine-tuning, the best a layer can do is replace the removed inputs by their best linear estimate
from the kept ones (and their mean by the layer's bias, where it has one): ``W x ~ W_K' x_K + d``,
solved in closed form from moments of the layer's input on the calibration data (the channel
pruning of He et al. 2017, without the LASSO step). For a 2-D Conv, ``x`` is one im2col row (the
input patch of one output position, channel-major like the weight); for Gemm/MatMul it is the
feature vector.

A :class:`Refit` holds one layer's result over all its output rows; :func:`apply_refits`
installs the kept rows in the channel-removed model. The refits come from the graph-order walk of
:mod:`onnx_basisprune.pipeline.channel_refit` (the default), or from :func:`independent_refits`:
each layer that loses input channels on its own, from the moments ``E[x x^T]``, ``E[x]`` of its
input in the original model, gathered by the Torch stage in the same pass as the channel
importance (:func:`onnx_basisprune.calibration.importance.measure_channel_importance`) for the
layers :func:`refittable_consumers` names: Conv with ``group == 1`` and a 2-D kernel, Gemm
(``transA == 0``) and MatMul with a constant 2-D weight, up to :data:`MAX_INPUTS` inputs per row
(the moment matrix is D x D). Other consumers just lose the columns, as
:class:`~onnx_basisprune.channels.rewrite.RemoveChannelsPass` leaves them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from ..basis.layers import constant_array, fc_dims, fc_layout, fc_matrix
from ..basis.rewrite import add_to_bias, new_initializer
from ..basis.svd import refit_columns
from ..io.shapes import ShapeTable
from .analysis import ChannelAnalysis

MAX_INPUTS = 4608  # e.g. 512 channels x 3 x 3; the moments take D^2 float64


@dataclass(frozen=True)
class ConsumerInput:
    """How one layer reads its input: the im2col geometry of a 2-D Conv (``kernel`` set), or
    features on the last axis (``kernel`` None: Gemm/MatMul)."""

    node: str
    tensor: str
    size: int  # D: inputs of one row (per group)
    groups: int = 1
    kernel: tuple[int, int] | None = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)


def _conv_pads(node: ir.Node, in_shape: tuple[int, ...], kernel: tuple[int, int], strides, dilations) -> tuple[int, int, int, int] | None:
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_shape[2:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            b, e = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
            begin.append(b)
            end.append(e)
        return (begin[0], begin[1], end[0], end[1])
    pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
    return tuple(int(p) for p in pads) if len(pads) == 4 else None


def consumer_input(node: ir.Node, shapes: ShapeTable) -> ConsumerInput | None:
    """How ``node`` reads its input, or None when it is not a 2-D Conv / Gemm / MatMul with a
    constant weight (or its input shape or padding is unknown)."""
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or node.inputs[0] is None:
        return None
    x = node.inputs[0]
    if node.op_type == "Conv":
        in_shape = shapes.get(x)
        if weight.ndim != 4 or in_shape is None:
            return None
        kernel = tuple(int(k) for k in weight.shape[2:])
        strides = tuple(node.attributes.get_ints("strides", [1, 1]))
        dilations = tuple(node.attributes.get_ints("dilations", [1, 1]))
        pads = _conv_pads(node, in_shape, kernel, strides, dilations)
        if pads is None:
            return None
        groups = node.attributes.get_int("group", 1)
        return ConsumerInput(node.name, x.name, int(np.prod(weight.shape[1:])), groups, kernel, pads, strides, dilations)
    if node.op_type in ("Gemm", "MatMul") and node.attributes.get_int("transA", 0) == 0 and weight.ndim == 2:
        return ConsumerInput(node.name, x.name, int(fc_dims(node, weight.shape)[1]))
    return None


def refittable_consumers(model: ir.Model, analysis: ChannelAnalysis, shapes: ShapeTable) -> dict[str, ConsumerInput]:
    """The layers whose input channels some prunable group holds and that can be refitted."""
    layer_channels = analysis.layer_channels()
    out = {}
    for node in model.graph:
        if node.name not in layer_channels or not (layer_channels[node.name][1] >= 0).any():
            continue
        spec = consumer_input(node, shapes)
        if spec is not None and spec.groups == 1 and spec.size <= MAX_INPUTS:
            out[node.name] = spec
    return out


def _weight_matrix(node: ir.Node) -> np.ndarray:
    """The node's weight as (out, D) with ``y = W x`` (Gemm alpha folded in)."""
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return fc_matrix(node, w)


def has_bias(node: ir.Node) -> bool:
    """Whether the node has a bias input. Removed inputs' means go into it, where it has one
    (exported Convs have one once BatchNorm is folded); no bias is added, so the cost model holds."""
    return len(node.inputs) > 2 and node.inputs[2] is not None


@dataclass(frozen=True)
class Refit:
    """A layer refitted on its kept inputs, every output row: ``weight`` (out, kept D) with
    ``y = W x`` (Gemm alpha folded in), ``delta`` (out,) added to its bias (0 without one)."""

    weight: np.ndarray
    delta: np.ndarray


def kept_channels(analysis: ChannelAnalysis, removed: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per Conv/Gemm/MatMul node: (kept output channels, kept input channels or features), bool."""
    def kept(groups: np.ndarray) -> np.ndarray:
        return (groups < 0) | ~removed[np.maximum(groups, 0)]

    return {name: (kept(out), kept(inp)) for name, (out, inp) in analysis.layer_channels().items()}


def kept_columns(keep_in: np.ndarray, width: int) -> np.ndarray:
    """Indices of the kept columns of a (out, ``width``) weight matrix whose input channels (or
    features) ``keep_in`` flags: a Conv's columns are channel-major, kernel positions inside."""
    return np.flatnonzero(np.repeat(keep_in, width // len(keep_in)))


def independent_refits(original: ir.Model, analysis: ChannelAnalysis, removed: np.ndarray,
                       moments: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Refit]:
    """The least-squares refit of every layer that loses input channels and has ``moments``
    (node name -> (E[x x^T], E[x]) of its input in ``original``): each layer on its own, as if
    its kept inputs were unchanged."""
    keeps = kept_channels(analysis, removed)
    refits = {}
    for node in original.graph:
        if node.name not in moments or keeps[node.name][1].all():
            continue
        weight = _weight_matrix(node)
        second, mean = moments[node.name]
        columns = kept_columns(keeps[node.name][1], weight.shape[1])
        refits[node.name] = Refit(*refit_columns(weight, columns, second, mean, has_bias(node)))
    return refits


def apply_refits(pruned: ir.Model, analysis: ChannelAnalysis, removed: np.ndarray, refits: Mapping[str, Refit]) -> int:
    """Install ``refits`` (from the model the analysis was made of) in ``pruned``, that model
    with the groups flagged in ``removed`` taken out: the kept rows of each refit become the
    node's weight, their deltas go into its bias. Returns how many layers were refitted."""
    keeps = kept_channels(analysis, removed)
    count = 0
    for node in pruned.graph:
        refit = refits.get(node.name)
        if refit is None:
            continue
        keep_out, keep_in = keeps[node.name]
        fitted = refit.weight[keep_out]
        old_shape = tuple(node.inputs[1].const_value.shape)
        dtype = node.inputs[1].const_value.numpy().dtype
        if node.op_type == "Conv":
            new = fitted.reshape(int(keep_out.sum()), int(keep_in.sum()), *old_shape[2:])
        else:
            new = fc_layout(node, fitted)
            if node.op_type == "Gemm":
                node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)  # alpha is folded into the fit
        assert new.shape == old_shape, (node.name, new.shape, old_shape)
        node.replace_input_with(1, new_initializer(pruned.graph, f"{node.name}.weight_refit", new.astype(dtype)))
        if has_bias(node):
            add_to_bias(pruned.graph, node, refit.delta[keep_out], dtype)
        count += 1
    if count:
        common.RemoveUnusedNodesPass()(pruned)  # the weights the refit replaced
    return count


def refit_consumers(pruned: ir.Model, original: ir.Model, analysis: ChannelAnalysis, removed: np.ndarray,
                    moments: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Replace, in ``pruned`` (``original`` after removing the groups flagged in ``removed``),
    the weight and bias of every layer that lost input channels and has ``moments`` by their
    independent least-squares refit (:func:`independent_refits`). Returns how many layers were
    refitted."""
    return apply_refits(pruned, analysis, removed, independent_refits(original, analysis, removed, moments))
