"""The graph walk of the channel analysis: one pass over the nodes in order, allocating an
*element* per channel of every activation tensor and recording which elements ops couple.

:class:`Walker` holds everything the walk learns: the tensors (:class:`~.records.Tensor`, their channel
axis and element ids), the coupling edges, the reasons some elements can never be removed, the
status :class:`~.records.Transfer` of every tensor (for the gate sites), and the constant edits and MAC
terms the cost model needs. What each op does is not here: :meth:`Walker.visit` looks its
handler up in the op table it is given (:data:`.ops.OPS`); the symbolic shape values of shape
subgraphs are tracked by :class:`~.shape_values.ShapeValues`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ..basis.layers import constant_array
from ..io.shapes import ShapeTable
from .records import AttrEdit, SliceEdit, Tensor, Transfer, Unsupported, ValueEdit
from .shape_values import SHAPE_OPS, ShapeValues

Handler = Callable[["Walker", ir.Node], None]


class Walker(ShapeValues):
    """The state of one walk over a normalised model (see the module docstring)."""

    def __init__(self, model: ir.Model, shapes: ShapeTable, handler: Callable[[str], Handler | None]):
        self.model, self.shapes, self.graph, self.handler = model, shapes, model.graph, handler
        self.opset = model.opset_imports.get("", 1)
        self.tensors: dict[str, Tensor] = {}
        self.n = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.bad: list[tuple[np.ndarray, str]] = []
        self.producer_rows: list[tuple[str, str]] = []  # (node, output tensor)
        self.consumer_cols: list[tuple[str, str]] = []  # (node, input tensor)
        self.depthwise: list[tuple[str, str]] = []
        self.transfers: list[Transfer] = []
        self.sinks: list[str] = []  # tensors whose removed elements must be 0 (consumer inputs)
        self.shape_vals: dict[str, list] = {}  # symbolic shape tensors: entries int | frozenset
        self.slice_edits: list[SliceEdit] = []
        self.value_edits: list[ValueEdit] = []
        self.attr_edits: list[AttrEdit] = []
        self.layers: dict[str, tuple[str | None, str | None]] = {}
        self.mac_nodes: dict[str, tuple[str, str | None, int]] = {}  # node -> (out, in, factor)
        self._consts: dict[str, np.ndarray | None] = {}
        names = [node.name for node in self.graph]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError("node names must be unique and non-empty: analyse a normalised model (api.prepare)")

    # --- small helpers --------------------------------------------------------------------

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None or value.const_value is None or value.is_graph_input():
            return None
        if value.name not in self._consts:
            self._consts[value.name] = constant_array(value)
        return self._consts[value.name]

    def kind(self, value: ir.Value | None) -> str:
        if value is None:
            return "none"
        if value.const_value is not None and not value.is_graph_input():
            return "const"
        if value.name in self.tensors:
            return "tensor"
        if value.name in self.shape_vals:
            return "shape"
        return "untracked"

    def dims(self, value: ir.Value) -> tuple[int, ...]:
        dims = self.shapes.get(value)
        if dims is None:
            raise Unsupported(f"shape of '{value.name}' unknown")
        return tuple(int(d) for d in dims)

    def t(self, value: ir.Value) -> Tensor:
        return self.tensors[value.name]

    def alloc(self, value: ir.Value, axis: int, dtype: ir.DataType | None = None, size: int | None = None) -> Tensor:
        if value.name in self.tensors:
            return self.tensors[value.name]
        dims = self.dims(value)
        if not dims:
            raise Unsupported(f"'{value.name}' is a scalar")
        axis = axis % len(dims)
        size = dims[axis] if size is None else size
        t = Tensor(value.name, len(self.tensors), axis, len(dims), size, self.n, value.dtype or dtype)
        self.tensors[value.name] = t
        self.n += size
        return t

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.edges.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def mark_bad(self, t: Tensor, reason: str) -> None:
        self.bad.append((t.ids, reason))

    def identity(self, out: Tensor, src: Tensor, create: np.ndarray | None = None) -> None:
        """out[c] <-> src[c], out zero iff src zero (unless ``create``)."""
        self.union(out.ids, src.ids)
        self.transfers.append(Transfer(out.name, "or", [(src.name, np.arange(src.size))], create))

    def input_tensor(self, node: ir.Node, index: int = 0, axis: int | None = None) -> Tensor:
        value = node.inputs[index] if index < len(node.inputs) else None
        if self.kind(value) != "tensor":
            raise Unsupported(f"input {index} of {node.op_type} '{node.name}' is not an activation")
        t = self.t(value)
        if axis is not None and t.axis != axis:
            raise Unsupported(
                f"{node.op_type} '{node.name}' works on axis {axis}, channels of '{t.name}' are on axis {t.axis}"
            )
        return t

    def attr_int(self, node: ir.Node, name: str, default: int) -> int:
        return node.attributes.get_int(name, default)

    # --- the walk ---------------------------------------------------------------------------

    def run(self) -> None:
        """Visit every node in order, then mark what graph inputs, outputs and subgraphs reach."""
        for value in self.graph.inputs:
            if value.is_initializer() or self.shapes.get(value) is None or not self.shapes.get(value):
                continue
            t = self.alloc(value, 1 if len(self.shapes.get(value)) >= 2 else 0)
            self.mark_bad(t, f"graph input '{value.name}'")
        for node in self.graph:
            self.visit(node)
        for value in self.graph.outputs:
            if value.name in self.tensors:
                self.mark_bad(self.tensors[value.name], f"reaches graph output '{value.name}'")
        for t in self.tensors.values():
            value = self._value(t.name)
            if value is not None and any(use.node.graph is not self.graph for use in value.uses()):
                self.mark_bad(t, f"'{t.name}' is used inside a subgraph")

    def _value(self, name: str) -> ir.Value | None:
        if not hasattr(self, "_values"):
            self._values = {v.name: v for v in self.graph.inputs}
            self._values.update({v.name: v for n in self.graph for v in n.outputs})
        return self._values.get(name)

    def visit(self, node: ir.Node) -> None:
        kinds = [self.kind(v) for v in node.inputs]
        if node.domain not in ("", "ai.onnx"):
            return self.unsupported(node, f"op {node.domain}::{node.op_type} ('{node.name}')")
        if node.op_type in ("Shape", "Size"):
            return self.shape_source(node)
        if "shape" in kinds:
            if node.op_type in SHAPE_OPS and all(k in ("shape", "const", "none") for k in kinds):
                if self.shape_eval(node):
                    return None
            for value, kind in zip(node.inputs, kinds):
                if kind == "shape":
                    self.shape_sink(value, node)
            if not (node.op_type == "Reshape" and kinds[0] == "tensor" and kinds[1] == "shape"):
                return self.unsupported(node, f"{node.op_type} '{node.name}' computes on a shape")
        if "untracked" in kinds:
            name = node.inputs[kinds.index("untracked")].name
            return self.unsupported(node, f"input '{name}' of {node.op_type} '{node.name}' is not tracked")
        if "tensor" not in kinds:
            return self.unsupported(node, f"{node.op_type} '{node.name}' has no activation input")
        handler = self.handler(node.op_type)
        if handler is None:
            return self.unsupported(node, f"unsupported op {node.op_type} ('{node.name}')")
        try:
            handler(self, node)
        except Unsupported as exc:
            self.unsupported(node, str(exc))
        return None

    def unsupported(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            if self.kind(value) == "tensor":
                self.mark_bad(self.t(value), reason)
        for value in node.outputs:
            if value.name in self.tensors:
                self.mark_bad(self.tensors[value.name], reason)
                continue
            dims = self.shapes.get(value)
            if dims and value.name and value.name not in self.shape_vals:
                self.mark_bad(self.alloc(value, 1 if len(dims) >= 2 else 0), reason)
