"""Find the layers a basis split applies to and describe each one in a small record.

A candidate is a Conv with a constant weight (1-D/2-D/3-D, any kernel, grouped or not), a Gemm
with a constant ``B`` (and ``transA == 0``), or a MatMul whose second input is a constant 2-D
matrix. Each gets one :class:`Layer` record holding everything later stages need (geometry, the
grouped SVD, the cost at batch 1) so no stage re-discovers what an earlier one knew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..io.shapes import ShapeTable
from . import svd as svdlib

SPLITTABLE_OPS = ("Conv", "Gemm", "MatMul")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

# Cost model used to decide whether a split pays off (units: multiply-accumulates at batch 1).
# An extra node costs a fixed launch/dispatch overhead, and the intermediate basis tensor is
# written once and read once. Both terms are deliberately simple; see README "Cost model".
NODE_OVERHEAD_MACS = 20_000
INTERMEDIATE_MACS_PER_ELEMENT = 2.0


@dataclass
class Layer:
    """One splittable node of the normalised model."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    dtype: ir.DataType
    groups: int
    out_channels: int  # C_out (Conv) or N (fully connected)
    fan_in: int  # per-group columns of the weight matrix
    # Output positions per sample: prod(spatial) for Conv, rows for Gemm/MatMul; 0 when the
    # output size is unknown (symbolic input size): MACs are then unknown.
    positions: int
    svd: svdlib.GroupedSVD | None = field(default=None, repr=False)
    skip_reason: str | None = None
    # Basis-output moments on calibration data; when set, kept bases get least-squares scaling.
    stats: svdlib.BasisStats | None = field(default=None, repr=False)
    # Break-even rank measured on the target provider (--latency-aware); overrides the cost model.
    measured_break_even: int | None = None

    @property
    def full_rank(self) -> int:
        return min(self.out_channels // self.groups, self.fan_in)

    @property
    def params(self) -> int:
        return self.out_channels * self.fan_in

    @property
    def positions_known(self) -> bool:
        return self.positions > 0

    @property
    def macs(self) -> int:
        return self.params * self.positions

    def split_params(self, rank: int) -> int:
        """Weight elements of the basis + scaling pair at ``rank`` bases per group."""
        return rank * (self.groups * self.fan_in + self.out_channels)

    def split_macs(self, rank: int) -> int:
        return self.split_params(rank) * self.positions

    def split_cost(self, rank: int) -> float:
        """Cost-model estimate of the pair (MACs + node overhead + intermediate traffic)."""
        intermediate = self.groups * rank * self.positions
        return self.split_macs(rank) + NODE_OVERHEAD_MACS + INTERMEDIATE_MACS_PER_ELEMENT * intermediate

    @property
    def break_even_rank(self) -> int:
        """Largest rank per group at which the split still costs less than the original layer:
        measured on the target provider when known, else from the cost model."""
        if self.measured_break_even is not None:
            return self.measured_break_even
        return self.model_break_even_rank

    @property
    def model_break_even_rank(self) -> int:
        """The cost model's break-even rank (MACs + node overhead + intermediate traffic); where
        the output size is unknown, the largest rank whose pair has fewer weights than the layer."""
        saving, per_rank = self.params, self.split_params(1)
        if self.positions_known:
            saving = self.macs - NODE_OVERHEAD_MACS
            per_rank = self.positions * (
                self.groups * self.fan_in + self.out_channels + INTERMEDIATE_MACS_PER_ELEMENT * self.groups
            )
        best = math.ceil(saving / per_rank) - 1 if per_rank else 0
        return max(0, min(best, self.full_rank))

    def weight_matrices(self, weight: np.ndarray) -> np.ndarray:
        """The weight as per-group matrices (groups, out_g, fan_in), ``y = W x`` convention."""
        if self.op == "Conv":
            return svdlib.conv_weight_matrices(weight, self.groups)
        return weight[None]


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant input (an initializer that is not a graph input)."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def fc_dims(node: ir.Node, weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(outputs, inputs) of a Gemm/MatMul whose second input has the 2-D ``weight_shape``."""
    if node.op_type == "MatMul":
        return weight_shape[1], weight_shape[0]
    return (weight_shape[0], weight_shape[1]) if node.attributes.get_int("transB", 0) else (weight_shape[1], weight_shape[0])


def fc_matrix(node: ir.Node, b: np.ndarray) -> np.ndarray:
    """A Gemm/MatMul's 2-D second input ``b`` as ``W`` (outputs, inputs) with ``y = x @ W.T``,
    Gemm's ``alpha`` folded in."""
    if node.op_type == "MatMul":
        return b.T
    w = b if node.attributes.get_int("transB", 0) else b.T
    alpha = node.attributes.get_float("alpha", 1.0)
    return w * alpha if alpha != 1.0 else w


def fc_layout(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """``W`` (outputs, inputs) in the layout of the node's second input: the inverse of
    :func:`fc_matrix` for the node with ``alpha`` set to 1."""
    if node.op_type == "MatMul":
        return w.T
    return w if node.attributes.get_int("transB", 0) else w.T


def _fc_weight(node: ir.Node) -> np.ndarray | None:
    """``W`` with ``y = x @ W.T`` for Gemm/MatMul, alpha folded in, or None if not constant."""
    b = constant_array(node.inputs[1])
    if b is None or b.ndim != 2:
        return None
    return fc_matrix(node, b)


def node_weight(node: ir.Node) -> np.ndarray | None:
    """The constant weight of a splittable node in its own layout (Conv) or as ``W`` (FC)."""
    if node.op_type == "Conv":
        return constant_array(node.inputs[1])
    return _fc_weight(node)


def _skip_reason(node: ir.Node) -> str | None:
    """Why a candidate node can not be split at all, or None."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "no weight input"
    weight = node.inputs[1]
    if constant_array(weight) is None:
        return "weight is not a constant"
    if weight.const_value.dtype not in FLOAT_TYPES:
        return f"unsupported weight dtype {weight.const_value.dtype.name}"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    if node.op_type == "MatMul" and len(weight.const_value.shape) != 2:
        return "MatMul weight is not a 2-D matrix"
    if node.op_type == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None:
        if constant_array(node.inputs[2]) is None:
            return "bias is not a constant"
    return None


def describe_node(node: ir.Node, shapes: ShapeTable) -> Layer:
    """Build the record for one candidate node (without the SVD)."""
    reason = _skip_reason(node)
    weight_value = node.inputs[1] if len(node.inputs) > 1 else None
    wshape = tuple(weight_value.const_value.shape) if weight_value is not None and weight_value.const_value is not None else ()
    dtype = weight_value.const_value.dtype if weight_value is not None and weight_value.const_value is not None else ir.DataType.UNDEFINED
    out_shape = shapes.get(node.outputs[0])
    if node.op_type == "Conv" and len(wshape) >= 3:
        groups = node.attributes.get_int("group", 1)
        out_channels, fan_in = wshape[0], int(np.prod(wshape[1:]))
        positions = int(np.prod(out_shape[2:])) if out_shape is not None else 0
    elif len(wshape) == 2:
        groups = 1
        out_channels, fan_in = fc_dims(node, wshape)
        positions = int(np.prod(out_shape[1:-1])) if out_shape is not None else 0
    else:
        groups, out_channels, fan_in, positions = 1, 0, 0, 0
        reason = reason or f"weight of rank {len(wshape)}"
    layer = Layer(
        name=node.name or "",
        op=node.op_type,
        weight_shape=wshape,
        dtype=dtype,
        groups=groups,
        out_channels=out_channels,
        fan_in=fan_in,
        positions=positions,
        skip_reason=reason,
    )
    if reason is None and layer.break_even_rank < 1:
        layer.skip_reason = (
            "depthwise: the split can never pay off"
            if groups > 1 and fan_in == int(np.prod(wshape[2:]))
            else "rank bound too small: the split can never pay off"
        )
    return layer


def find_layers(model: ir.Model, shapes: ShapeTable, with_svd: bool = True) -> dict[str, Layer]:
    """Records for every Conv/Gemm/MatMul of the main graph, keyed by node name, SVD included."""
    layers: dict[str, Layer] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SPLITTABLE_OPS:
            continue
        layer = describe_node(node, shapes)
        if node.op_type == "MatMul" and layer.skip_reason == "weight is not a constant":
            continue  # activation x activation products (attention) are not layers
        if with_svd and layer.skip_reason is None:
            weight = node_weight(node).astype(np.float64)
            layer.svd = svdlib.grouped_svd(layer.weight_matrices(weight))
        layers[layer.name] = layer
    return layers
