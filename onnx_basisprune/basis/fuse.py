"""Merge two consecutive pointwise linear nodes into one, where that is exact and not costlier.

A split layer ends in a *scaling* node, a 1x1 Conv or a matrix product with no nonlinearity
after it; where its output goes straight into another 1x1 Conv (MobileNetV2's projection into
the next expansion) or another Gemm/MatMul, the two maps ``y = B (A x + a) + b`` are one:
``y = (B A) x + (B a + b)``, computed in float64 and cast back to the weights' dtype.

:class:`FuseLinearPass` merges node A into its consumer B when all of these hold:

* both are Conv with a kernel of size 1 in every spatial dim, strides 1 and no padding
  (dilations do not matter at kernel size 1), or both are matrix products in any mix: Gemm
  (``transA=0``, any ``alpha``, ``beta``, ``transB``, a bias that is the same for every row) or
  MatMul with the weight as second input;
* A's output is not a graph output and B, as its data input, is its only consumer;
* every weight and bias is a constant initializer (not overridable as a graph input), of one
  float dtype (float16, float32 or float64);
* **the merge does not increase the cost**: the merged node's multiply-accumulates per output
  position (or row) are at most those of A and B together. A grouped Conv counts
  ``out * in / group``; the merged Conv takes ``group = gcd(group_A, group_B)``, as both weights
  are block-diagonal over that many contiguous channel blocks and so is their product. Merging a
  low-rank pair (``in -> r -> out``) back into a full ``out x in`` matrix is refused where
  ``out * in > r * (in + out)``.

The merged node reads A's input and writes B's output value; it carries ``basisprune.role =
"fused"`` and ``basisprune.layer`` listing the layers of A and B, comma-joined, each once. Merging repeats
until no pair qualifies; initializers left unused are then removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import scipy.linalg

from .layers import fc_matrix
from .rewrite import META_LAYER, META_ROLE, legacy_gemm_attrs, new_initializer

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class _Linear:
    """A pointwise linear node as ``y = matrix @ x + bias`` (float64), ``matrix`` (out, in)
    block-diagonal over ``groups`` contiguous channel blocks."""

    matrix: np.ndarray
    bias: np.ndarray | None
    groups: int
    dtype: np.dtype

    @property
    def macs(self) -> int:
        """Multiply-accumulates per output position (Conv) or row (Gemm/MatMul)."""
        out, inp = self.matrix.shape
        return out * inp // self.groups


def _initializer(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant initializer that no graph input can override, else None."""
    if value is None or not value.is_initializer() or value.is_graph_input() or value.const_value is None:
        return None
    return value.const_value.numpy()


def _weights(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight, bias or None when absent), None when one of them is not a constant initializer
    or the weight is not a supported float."""
    weight = _initializer(node.inputs[1]) if len(node.inputs) > 1 else None
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = _initializer(bias_value)
    if weight is None or weight.dtype not in FLOAT_DTYPES or (bias_value is not None and bias is None):
        return None
    return weight, bias


def _conv(node: ir.Node, weight: np.ndarray, bias: np.ndarray | None) -> _Linear | None:
    if weight.ndim < 3 or any(d != 1 for d in weight.shape[2:]):
        return None
    if any(s != 1 for s in node.attributes.get_ints("strides", ())) or any(node.attributes.get_ints("pads", ())):
        return None
    groups = node.attributes.get_int("group", 1)
    blocks = np.split(weight.reshape(weight.shape[:2]).astype(np.float64), groups)
    bias = None if bias is None else bias.astype(np.float64)
    return _Linear(scipy.linalg.block_diag(*blocks), bias, groups, weight.dtype)


def _matrix_product(node: ir.Node, weight: np.ndarray, bias: np.ndarray | None) -> _Linear | None:
    if weight.ndim != 2:
        return None
    w = weight.astype(np.float64)
    if node.op_type == "MatMul":
        return _Linear(w.T, None, 1, weight.dtype)
    if node.attributes.get_int("transA", 0):
        return None
    matrix = fc_matrix(node, w)
    if bias is not None:
        c = bias[0] if bias.ndim == 2 and bias.shape[0] == 1 else bias  # (1, N): one row for all
        if c.ndim > 1 or c.size not in (1, len(matrix)):
            return None
        bias = node.attributes.get_float("beta", 1.0) * np.broadcast_to(c.astype(np.float64), len(matrix))
    return _Linear(matrix, bias, 1, weight.dtype)


def _linear(node: ir.Node) -> _Linear | None:
    """The node as a pointwise linear map, None when it is not one this pass can merge."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.outputs) != 1:
        return None
    weights = _weights(node)
    if weights is None:
        return None
    return (_conv if node.op_type == "Conv" else _matrix_product)(node, *weights)


def _consumer(node: ir.Node) -> ir.Node | None:
    """The node taking ``node``'s output as its data input, when that is its only use."""
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    user, index = uses[0]
    return user if index == 0 and user.graph is node.graph else None


def _compose(a: _Linear, b: _Linear) -> _Linear:
    """``b`` after ``a``, as one map."""
    bias = None if a.bias is None else b.matrix @ a.bias
    if b.bias is not None:
        bias = b.bias if bias is None else bias + b.bias
    return _Linear(b.matrix @ a.matrix, bias, math.gcd(a.groups, b.groups), a.dtype)


def _merged_node(graph: ir.Graph, a: ir.Node, b: ir.Node, fused: _Linear) -> ir.Node:
    """The node computing ``fused`` on A's input."""
    name = f"{a.name}+{b.name}"
    layers = dict.fromkeys(layer for n in (a, b) for layer in n.metadata_props.get(META_LAYER, "").split(",") if layer)
    meta = {META_ROLE: "fused", **({META_LAYER: ",".join(layers)} if layers else {})}
    attrs: list[ir.Attr] = []
    if b.op_type == "Conv":
        g, (out, inp) = fused.groups, fused.matrix.shape
        blocks = fused.matrix.reshape(g, out // g, g, inp // g)[np.arange(g), :, np.arange(g), :]
        spatial = len(b.inputs[1].const_value.shape) - 2
        op, weight = "Conv", blocks.reshape(out, inp // g, *([1] * spatial))
        attrs = [ir.AttrInt64("group", g), ir.AttrInt64s("kernel_shape", [1] * spatial)]
    elif fused.bias is None:
        op, weight = "MatMul", fused.matrix.T
    else:
        op, weight = "Gemm", fused.matrix
        attrs = [ir.AttrInt64("transB", 1), *legacy_gemm_attrs(graph)]
    inputs = [a.inputs[0], new_initializer(graph, f"{name}.weight", weight.astype(fused.dtype))]
    if fused.bias is not None:
        inputs.append(new_initializer(graph, f"{name}.bias", fused.bias.astype(fused.dtype)))
    return ir.Node("", op, inputs, attributes=attrs, name=name, metadata_props=meta)


class FuseLinearPass(ir.passes.InPlacePass):
    """Merge consecutive pointwise linear nodes where exact and not costlier (see the module
    docstring); ``merges`` counts the merges of the last call."""

    def __init__(self) -> None:
        super().__init__()
        self.merges = 0

    def _merge(self, graph: ir.Graph, a: ir.Node) -> ir.Node | None:
        """Merge ``a`` into its consumer when allowed; the merged node, else None."""
        b = _consumer(a)
        if b is None or (a.op_type == "Conv") != (b.op_type == "Conv"):
            return None
        la, lb = _linear(a), _linear(b)
        if la is None or lb is None or la.dtype != lb.dtype or lb.matrix.shape[1] != la.matrix.shape[0]:
            return None
        fused = _compose(la, lb)
        if fused.macs > la.macs + lb.macs:
            return None
        node = _merged_node(graph, a, b, fused)
        ir.convenience.replace_nodes_and_values(graph, b, [a, b], [node], list(b.outputs), list(node.outputs))
        return node

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.merges = 0
        work = list(reversed(list(graph)))  # popped in graph order
        while work:
            node = work.pop()
            if node.graph is not graph:  # merged away already
                continue
            merged = self._merge(graph, node)
            if merged is None:
                continue
            self.merges += 1
            work.append(merged)
            producer = merged.inputs[0].producer()
            if producer is not None:
                work.append(producer)  # may now merge into the cheaper merged node
        if self.merges:
            common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, self.merges > 0)


def fuse_linear(model: ir.Model) -> tuple[ir.Model, int]:
    """A copy of ``model`` with consecutive pointwise linear nodes merged, and how many merges
    were made; ``model`` itself is left unchanged."""
    fused = model.clone()
    fuse_pass = FuseLinearPass()
    fuse_pass(fused)
    return fused, fuse_pass.merges
