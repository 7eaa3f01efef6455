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
:mod:`onnx_basisprune.channel_rewrite`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .cost import COMPUTE_OPS, count_params, node_macs
from .layers import constant_array
from .shapes import ShapeTable

# ---------------------------------------------------------------------------------------------
# Public records


@dataclass(frozen=True, eq=False)
class GateSite:
    """A tensor of the normalised model where a per-channel mask multiplies the activation."""

    tensor: str
    axis: int  # channel axis of that tensor (non-negative)
    groups: np.ndarray  # (channels,) group index of each channel, -1 where unprunable


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
    _plan: _Plan = field(repr=False, compare=False)

    def removable(self) -> list[int]:
        """Indices of the prunable groups."""
        return [int(i) for i in np.flatnonzero(self._plan.prunable)]

    def cost(self, removed: np.ndarray) -> tuple[int, int]:
        """Exact (params, MACs at batch 1) of the whole model after removing the groups flagged
        in ``removed`` (bool, one per group), as onnx_basisprune.cost measures the rewritten model."""
        return self._plan.cost(self._plan.check_removed(removed))

    def layer_channels(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per Conv/Gemm/MatMul node: (group of each output channel, group of each input channel
        or flattened input feature); -1 where unprunable."""
        plan = self._plan
        return {name: (plan.public_groups(out), plan.public_groups(inp)) for name, (out, inp) in plan.layers.items()}

    def removed_mask(self, groups: Iterable[int]) -> np.ndarray:
        """The bool array of :meth:`cost` flagging ``groups``."""
        mask = np.zeros(len(self.groups), dtype=bool)
        mask[list(groups)] = True
        return self._plan.check_removed(mask)

    def emptied(self, removed: np.ndarray) -> list[str]:
        """Tensors that removing the groups flagged in ``removed`` would leave without any channel
        (such a removal is refused by the rewrite)."""
        plan = self._plan
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
    return _Analyser(model, shapes).run()


# ---------------------------------------------------------------------------------------------
# Internal records: tensors, constant edits, status transfers


@dataclass
class _Tensor:
    name: str
    index: int  # position in the plan's tensor list
    axis: int  # channel axis (non-negative)
    rank: int
    size: int  # elements along the channel axis
    offset: int  # id of the first element
    dtype: ir.DataType | None

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.offset, self.offset + self.size)


class _Kept:
    """Which elements survive a removal: positions per tensor."""

    def __init__(self, plan: _Plan, keep: np.ndarray):
        self.plan, self.keep = plan, keep

    def mask(self, name: str) -> np.ndarray:
        t = self.plan.tensors[name]
        return self.keep[t.offset : t.offset + t.size]

    def idx(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.mask(name))

    def count(self, name: str) -> int:
        return int(self.mask(name).sum())


@dataclass
class _SliceEdit:
    """Keep, along each listed axis of a constant input, the positions of one tensor's kept elements."""

    node: str
    index: int
    axes: tuple[tuple[int, str], ...]  # (constant axis, tensor whose elements run along it)
    shape: tuple[int, ...]

    def compute(self, array: np.ndarray, kept: _Kept) -> np.ndarray | None:
        out, changed = array, False
        for axis, tensor in self.axes:
            idx = kept.idx(tensor)
            if len(idx) != out.shape[axis]:
                out, changed = np.take(out, idx, axis=axis), True
        return out if changed else None


@dataclass
class _ValueEdit:
    """Recompute a small integer constant input (pads, starts, split sizes, reshape target, sizes);
    ``original`` is None when the input is absent and gets added."""

    node: str
    index: int
    fn: Callable[[np.ndarray | None, _Kept], np.ndarray | None]
    original: np.ndarray | None

    def compute(self, array: np.ndarray | None, kept: _Kept) -> np.ndarray | None:
        return self.fn(array, kept)


@dataclass
class _AttrEdit:
    """Attributes to set on a node (None value: remove the attribute)."""

    node: str
    fn: Callable[[_Kept], dict[str, ir.Attr | None]]


@dataclass
class _Transfer:
    """How the zero/non-zero status of a tensor's elements follows from its inputs when gates are
    0: ``fresh`` (producer rows), ``or`` (zero iff all sources zero and no ``create``), ``and``
    (zero iff any source zero). ``sources``: (tensor, source element position per output
    element, -1 for none)."""

    out: str
    kind: str
    sources: list[tuple[str, np.ndarray]]
    create: np.ndarray | None = None


class _Unsupported(Exception):
    pass


def constant_key(array: np.ndarray) -> tuple:
    """Identity of a constant's content: equal keys share one initializer after a rewrite."""
    return (array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())


def distinct_constants(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The distinct arrays (by :func:`constant_key`) in order of first appearance."""
    seen: dict[tuple, np.ndarray] = {}
    for a in arrays:
        seen.setdefault(constant_key(a), a)
    return list(seen.values())


@dataclass
class _Plan:
    """Everything the cost model and the rewrite need, indexed by tensor and node names."""

    tensors: dict[str, _Tensor]
    element_group: np.ndarray  # (elements,) group index (all groups)
    prunable: np.ndarray  # (groups,) bool
    slice_edits: list[_SliceEdit]
    value_edits: list[_ValueEdit]
    attr_edits: list[_AttrEdit]
    layers: dict[str, tuple[str | None, str | None]]  # compute node -> (output tensor, input tensor)
    init_uses: dict[str, int]  # initializer name -> number of uses, for those an edit touches
    edit_inits: dict[tuple[str, int], str]  # (node, input index) -> initializer name
    init_arrays: dict[str, np.ndarray]
    base_params: int
    fixed_macs: int
    mac_terms: np.ndarray  # (k, 3): tensor index a, tensor index b (or dummy), factor
    param_terms: np.ndarray  # (k, 4): tensor a, tensor b, factor, original size (unshared slices)
    shared_inits: list[str]  # initializers whose edits are costed by computing the arrays
    slow_keys: list[str]  # shared initializers and added inputs: costed by computing the arrays
    sizes: np.ndarray  # (tensors + 1,) elements per tensor, and 1 for the dummy tensor
    pair_tensor: np.ndarray  # (tensor, group, count) triples of prunable elements
    pair_group: np.ndarray
    pair_count: np.ndarray

    def public_groups(self, name: str | None) -> np.ndarray:
        if name is None:
            return np.zeros(0, dtype=np.int64)
        t = self.tensors[name]
        g = self.element_group[t.offset : t.offset + t.size]
        return np.where(self.prunable[g], g, -1)

    def check_removed(self, removed: np.ndarray) -> np.ndarray:
        removed = np.asarray(removed, dtype=bool)
        if removed.shape != self.prunable.shape:
            raise ValueError(f"removed has shape {removed.shape}, expected ({len(self.prunable)},)")
        if np.any(removed & ~self.prunable):
            bad = np.flatnonzero(removed & ~self.prunable)[:5].tolist()
            raise ValueError(f"groups {bad} are not prunable")
        return removed

    def kept(self, removed: np.ndarray) -> _Kept:
        return _Kept(self, ~removed[self.element_group])

    def kept_counts(self, removed: np.ndarray) -> np.ndarray:
        """Kept elements per tensor (and a trailing 1 for the dummy tensor)."""
        sizes = self.sizes
        if len(self.pair_group):
            gone = np.bincount(self.pair_tensor, weights=self.pair_count * removed[self.pair_group], minlength=len(sizes))
            sizes = sizes - np.rint(gone).astype(np.int64)
        return sizes

    def cost(self, removed: np.ndarray) -> tuple[int, int]:
        kept = self.kept_counts(removed)
        t = self.mac_terms
        macs = self.fixed_macs + int(np.sum(kept[t[:, 0]] * kept[t[:, 1]] * t[:, 2]))
        p = self.param_terms
        params = self.base_params + int(np.sum(kept[p[:, 0]] * kept[p[:, 1]] * p[:, 2] - p[:, 3]))
        if self.slow_keys:
            params += self.edited_params_delta(self.kept(removed))
        return params, macs

    def new_constants(self, kept: _Kept, names: Iterable[str] | None = None) -> dict[str, tuple[list, list[np.ndarray]]]:
        """Per edited initializer (or new input, keyed by node/index): the edited uses with their
        new arrays (None: unchanged), and the distinct arrays the rewritten model will hold."""
        by_init: dict[str, list[tuple[_SliceEdit | _ValueEdit, np.ndarray | None]]] = {}
        wanted = None if names is None else set(names)
        for edit in [*self.slice_edits, *self.value_edits]:
            key = self.edit_inits.get((edit.node, edit.index)) or f"<new>{edit.node}:{edit.index}"
            if wanted is not None and key not in wanted:
                continue
            original = self.init_arrays.get(key)
            by_init.setdefault(key, []).append((edit, edit.compute(original, kept)))
        result = {}
        for key, edits in by_init.items():
            original = self.init_arrays.get(key)
            arrays = [a for _, a in edits if a is not None]
            unchanged = len(edits) - len(arrays) + (self.init_uses.get(key, 0) - len(edits))
            if original is not None and unchanged > 0:
                arrays = [original, *arrays]
            result[key] = (edits, distinct_constants(arrays) if arrays else ([] if original is None else [original]))
        return result

    def edited_params_delta(self, kept: _Kept) -> int:
        """Params change of the initializers costed by computing their arrays."""
        delta = 0
        for key, (_, arrays) in self.new_constants(kept, self.slow_keys).items():
            original = self.init_arrays.get(key)
            delta += sum(int(a.size) for a in arrays) - (0 if original is None else int(original.size))
        return delta


# ---------------------------------------------------------------------------------------------
# Zero behaviour of per-channel ops: f(0) per op (0 means the op keeps a removed channel at 0)

_ZERO_UNARY = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "HardSwish", "Tanh", "Gelu", "Erf", "Neg", "Abs",
    "Softsign", "Mish", "ThresholdedRelu", "Sign", "Floor", "Ceil", "Round", "Sin", "Sqrt",
    "Identity", "Dropout", "Cast",
}  # fmt: skip
_CREATE_UNARY = {"Sigmoid": 0.5, "Softplus": math.log(2.0), "Exp": 1.0, "Cos": 1.0}
_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceProd"}
_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Max": np.maximum, "Min": np.minimum, "Sum": np.add, "Mean": np.add,
}  # fmt: skip
_SHAPE_OPS = {
    "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity", "Add", "Sub", "Mul",
    "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Max", "Min", "ReduceProd", "ReduceSum",
}  # fmt: skip


def _prod(dims: Iterable[int]) -> int:
    return int(math.prod(int(d) for d in dims))


def _merge_map(in_dims: tuple[int, ...], a: int, out_dims: tuple[int, ...]) -> tuple[int, int] | None:
    """For a reshape of ``in_dims`` (channel axis ``a``) to ``out_dims``: (b, inner) when output axis
    b is the row-major merge of input axes [i0, i1) with 1 <= i0 <= a < i1 and b >= 1 (the batch
    stays apart), so position j of axis b belongs to channel (j // inner) % C; None otherwise."""
    pin = [1]
    for d in in_dims:
        pin.append(pin[-1] * int(d))
    pout = [1]
    for d in out_dims:
        pout.append(pout[-1] * int(d))
    for i1 in range(a + 1, len(in_dims) + 1):
        for b in range(1, len(out_dims)):
            if pout[b + 1] != pin[i1]:
                continue
            for i0 in range(a, 0, -1):
                if pin[i0] == pout[b]:
                    return b, _prod(in_dims[a + 1 : i1])
    return None


# ---------------------------------------------------------------------------------------------
# The analysis


class _Analyser:
    def __init__(self, model: ir.Model, shapes: ShapeTable):
        self.model, self.shapes, self.graph = model, shapes, model.graph
        self.opset = model.opset_imports.get("", 1)
        self.tensors: dict[str, _Tensor] = {}
        self.n = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.bad: list[tuple[np.ndarray, str]] = []
        self.producer_rows: list[tuple[str, str]] = []  # (node, output tensor)
        self.consumer_cols: list[tuple[str, str]] = []  # (node, input tensor)
        self.depthwise: list[tuple[str, str]] = []
        self.transfers: list[_Transfer] = []
        self.sinks: list[str] = []  # tensors whose removed elements must be 0 (consumer inputs)
        self.shape_vals: dict[str, list] = {}  # symbolic shape tensors: entries int | frozenset
        self.slice_edits: list[_SliceEdit] = []
        self.value_edits: list[_ValueEdit] = []
        self.attr_edits: list[_AttrEdit] = []
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
            raise _Unsupported(f"shape of '{value.name}' unknown")
        return tuple(int(d) for d in dims)

    def t(self, value: ir.Value) -> _Tensor:
        return self.tensors[value.name]

    def alloc(self, value: ir.Value, axis: int, dtype: ir.DataType | None = None, size: int | None = None) -> _Tensor:
        if value.name in self.tensors:
            return self.tensors[value.name]
        dims = self.dims(value)
        if not dims:
            raise _Unsupported(f"'{value.name}' is a scalar")
        axis = axis % len(dims)
        size = dims[axis] if size is None else size
        t = _Tensor(value.name, len(self.tensors), axis, len(dims), size, self.n, value.dtype or dtype)
        self.tensors[value.name] = t
        self.n += size
        return t

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.edges.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def mark_bad(self, t: _Tensor, reason: str) -> None:
        self.bad.append((t.ids, reason))

    def identity(self, out: _Tensor, src: _Tensor, create: np.ndarray | None = None) -> None:
        """out[c] <-> src[c], out zero iff src zero (unless ``create``)."""
        self.union(out.ids, src.ids)
        self.transfers.append(_Transfer(out.name, "or", [(src.name, np.arange(src.size))], create))

    def input_tensor(self, node: ir.Node, index: int = 0, axis: int | None = None) -> _Tensor:
        value = node.inputs[index] if index < len(node.inputs) else None
        if self.kind(value) != "tensor":
            raise _Unsupported(f"input {index} of {node.op_type} '{node.name}' is not an activation")
        t = self.t(value)
        if axis is not None and t.axis != axis:
            raise _Unsupported(
                f"{node.op_type} '{node.name}' works on axis {axis}, channels of '{t.name}' are on axis {t.axis}"
            )
        return t

    def attr_int(self, node: ir.Node, name: str, default: int) -> int:
        return node.attributes.get_int(name, default)

    def slice_const(self, node: ir.Node, index: int, axes: tuple[tuple[int, str], ...]) -> None:
        array = self.const(node.inputs[index])
        self.slice_edits.append(_SliceEdit(node.name, index, axes, tuple(array.shape)))

    def only_first_output_used(self, node: ir.Node) -> None:
        for out in node.outputs[1:]:
            if out.uses() or out.is_graph_output():
                raise _Unsupported(f"output {out.name} of {node.op_type} '{node.name}' is used")

    # --- the walk ---------------------------------------------------------------------------

    def run(self) -> ChannelAnalysis:
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
        return self.finish()

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
            if node.op_type in _SHAPE_OPS and all(k in ("shape", "const", "none") for k in kinds):
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
        handler = getattr(self, f"op_{node.op_type}", None)
        if handler is None:
            if node.op_type in _ZERO_UNARY or node.op_type in _CREATE_UNARY:
                handler = self.op_unary
            elif node.op_type in _POOLS:
                handler = self.op_pool
            elif node.op_type in _REDUCE:
                handler = self.op_reduce
            elif node.op_type in _BINARY:
                handler = self.op_elementwise
        if handler is None:
            return self.unsupported(node, f"unsupported op {node.op_type} ('{node.name}')")
        try:
            handler(node)
        except _Unsupported as exc:
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

    # --- shape subgraphs ----------------------------------------------------------------------

    def shape_entries(self, value: ir.Value | None) -> list | None:
        if value is None:
            return None
        if value.name in self.shape_vals:
            return self.shape_vals[value.name]
        array = self.const(value)
        if array is not None and array.dtype.kind in "iu" and array.ndim <= 1:
            return [int(x) for x in np.atleast_1d(array)]
        return None

    def shape_source(self, node: ir.Node) -> None:
        value = node.inputs[0]
        dims = self.shapes.get(value)
        if node.op_type == "Size":
            rank = len(dims) if dims is not None else 8
            self.shape_vals[node.outputs[0].name] = [frozenset((value.name, i) for i in range(rank))]
            return
        if dims is None:
            self.shape_vals[node.outputs[0].name] = [frozenset((value.name, i) for i in range(8))]
            return
        rank = len(dims)
        start = self.attr_int(node, "start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        start, end = max(0, min(start, rank)), max(0, min(end, rank))
        self.shape_vals[node.outputs[0].name] = [frozenset({(value.name, i)}) for i in range(start, end)]

    def shape_eval(self, node: ir.Node) -> bool:
        """Entries of a shape computation's output, or False when it is not understood."""
        op = node.op_type
        ins = [self.shape_entries(v) for v in node.inputs]
        if ins and ins[0] is None:
            return False
        x = ins[0]
        try:
            if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
                out = list(x)
            elif op == "Gather":
                if self.attr_int(node, "axis", 0) != 0 or ins[1] is None:
                    return False
                out = [x[i] for i in ins[1]]
            elif op == "Concat":
                if any(e is None for e in ins):
                    return False
                out = [e for part in ins for e in part]
            elif op == "Slice":
                if len(node.inputs) < 3 or any(e is None for e in ins[1:]):
                    return False
                steps = ins[4][0] if len(ins) > 4 and ins[4] else 1
                out = list(x)[slice(ins[1][0], ins[2][0], steps)]
            elif op in ("Neg", "Abs", "Floor", "Ceil"):
                out = [e if isinstance(e, frozenset) else {"Neg": -e, "Abs": abs(e)}.get(op, e) for e in x]
            elif op in ("ReduceProd", "ReduceSum"):
                deps = frozenset().union(*[e for e in x if isinstance(e, frozenset)])
                out = [deps] if deps else [int(np.prod(x) if op == "ReduceProd" else np.sum(x))]
            else:  # binary arithmetic
                if len(ins) != 2 or ins[1] is None:
                    return False
                a, b = ins
                n = max(len(a), len(b))
                if len(a) not in (1, n) or len(b) not in (1, n):
                    return False
                a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
                out = []
                for ea, eb in zip(a, b):
                    if isinstance(ea, frozenset) or isinstance(eb, frozenset):
                        deps = [e for e in (ea, eb) if isinstance(e, frozenset)]
                        out.append(frozenset().union(*deps))
                    else:
                        f = {"Add": lambda p, q: p + q, "Sub": lambda p, q: p - q, "Mul": lambda p, q: p * q,
                             "Div": lambda p, q: int(p / q), "Mod": lambda p, q: p % q, "Max": max, "Min": min}[op]
                        out.append(int(f(ea, eb)))
        except (IndexError, ZeroDivisionError, KeyError, TypeError):
            return False
        self.shape_vals[node.outputs[0].name] = out
        return True

    def shape_sink(self, value: ir.Value, node: ir.Node) -> None:
        """A shape value used by a node that is not shape arithmetic: channel counts it reads make
        the groups of those tensors unprunable."""
        for entry in self.shape_vals[value.name]:
            if not isinstance(entry, frozenset):
                continue
            for name, axis in entry:
                t = self.tensors.get(name)
                if t is not None and axis == t.axis:
                    reason = f"channel count of '{name}' is read by a shape computation ({node.op_type} '{node.name}')"
                    self.mark_bad(t, reason)

    # --- compute nodes ------------------------------------------------------------------------

    def op_Conv(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0, axis=1)
        w = self.const(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            raise _Unsupported(f"Conv '{node.name}' weight is not a constant")
        b_value = node.inputs[2] if len(node.inputs) > 2 else None
        b = self.const(b_value)
        if b_value is not None and b is None:
            raise _Unsupported(f"Conv '{node.name}' bias is not a constant")
        group = self.attr_int(node, "group", 1)
        if w.ndim != x.rank or x.size != w.shape[1] * group:
            raise _Unsupported(f"Conv '{node.name}' weight {w.shape} does not match input channels {x.size}")
        out = self.alloc(node.outputs[0], 1, node.inputs[1].dtype)
        out_dims = self.dims(node.outputs[0])
        factor = _prod(out_dims) // out.size * _prod(w.shape[2:])
        self.layers[node.name] = (out.name, x.name)
        if group == 1:
            self.producer_rows.append((node.name, out.name))
            self.consumer_cols.append((node.name, x.name))
            self.transfers.append(_Transfer(out.name, "fresh", []))
            self.sinks.append(x.name)
            self.slice_const(node, 1, ((0, out.name), (1, x.name)))
            self.mac_nodes[node.name] = (out.name, x.name, factor)
        elif group == x.size == out.size and w.shape[1] == 1:
            self.depthwise.append((node.name, out.name))
            self.identity(out, x, None if b is None else (b != 0))
            self.slice_const(node, 1, ((0, out.name),))
            group_attr = lambda kept, o=out.name: {"group": ir.AttrInt64("group", kept.count(o))}  # noqa: E731
            self.attr_edits.append(_AttrEdit(node.name, group_attr))
            self.mac_nodes[node.name] = (out.name, None, factor)
        else:
            reason = f"grouped Conv '{node.name}' (group={group})"
            self.mark_bad(x, reason)
            self.mark_bad(out, reason)
            return
        if b is not None:
            self.slice_const(node, 2, ((0, out.name),))

    def op_Gemm(self, node: ir.Node) -> None:
        a = self.input_tensor(node, 0, axis=1)
        if a.rank != 2 or self.attr_int(node, "transA", 0):
            raise _Unsupported(f"Gemm '{node.name}' with transA=1 or input of rank {a.rank}")
        w = self.const(node.inputs[1])
        if w is None or w.ndim != 2:
            raise _Unsupported(f"Gemm '{node.name}' B is not a constant matrix")
        trans_b = self.attr_int(node, "transB", 0)
        if (w.shape[1] if trans_b else w.shape[0]) != a.size:
            raise _Unsupported(f"Gemm '{node.name}' B {w.shape} does not match input features {a.size}")
        c_value = node.inputs[2] if len(node.inputs) > 2 else None
        c = self.const(c_value)
        if c_value is not None and c is None:
            raise _Unsupported(f"Gemm '{node.name}' C is not a constant")
        out = self.alloc(node.outputs[0], 1, node.inputs[1].dtype)
        self.layers[node.name] = (out.name, a.name)
        self.producer_rows.append((node.name, out.name))
        self.consumer_cols.append((node.name, a.name))
        self.transfers.append(_Transfer(out.name, "fresh", []))
        self.sinks.append(a.name)
        self.slice_const(node, 1, ((0, out.name), (1, a.name)) if trans_b else ((0, a.name), (1, out.name)))
        if c is not None and c.ndim >= 1 and c.shape[-1] == out.size and out.size > 1:
            self.slice_const(node, 2, ((c.ndim - 1, out.name),))
        self.mac_nodes[node.name] = (out.name, a.name, self.dims(node.outputs[0])[0])

    def op_MatMul(self, node: ir.Node) -> None:
        if self.kind(node.inputs[1]) == "tensor":
            x = self.t(node.inputs[0]) if self.kind(node.inputs[0]) == "tensor" else None
            reason = f"MatMul '{node.name}' between two activations"
            for t in (x, self.t(node.inputs[1])):
                if t is not None:
                    self.mark_bad(t, reason)
            raise _Unsupported(reason)
        x = self.input_tensor(node, 0)
        w = self.const(node.inputs[1])
        if w is None or w.ndim != 2 or x.axis != x.rank - 1 or w.shape[0] != x.size:
            raise _Unsupported(f"MatMul '{node.name}' is not activation (..., K) x constant (K, N)")
        out = self.alloc(node.outputs[0], -1, node.inputs[1].dtype)
        self.layers[node.name] = (out.name, x.name)
        self.producer_rows.append((node.name, out.name))
        self.consumer_cols.append((node.name, x.name))
        self.transfers.append(_Transfer(out.name, "fresh", []))
        self.sinks.append(x.name)
        self.slice_const(node, 1, ((0, x.name), (1, out.name)))
        self.mac_nodes[node.name] = (out.name, x.name, _prod(self.dims(node.outputs[0])[:-1]))

    # --- per-channel ops ---------------------------------------------------------------------

    def op_unary(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        op = node.op_type
        if op == "Dropout":
            self.only_first_output_used(node)
            mode = self.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.array(False)
            if mode is None or bool(mode):
                raise _Unsupported(f"Dropout '{node.name}' may be in training mode")
        dtype = ir.DataType(self.attr_int(node, "to", 1)) if op == "Cast" else x.dtype
        out = self.alloc(node.outputs[0], x.axis, dtype)
        f0 = _CREATE_UNARY.get(op, 0.0)
        self.identity(out, x, np.full(x.size, True) if f0 != 0 else None)

    def op_HardSigmoid(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        out = self.alloc(node.outputs[0], x.axis, x.dtype)
        beta = node.attributes.get_float("beta", 0.5)
        f0 = min(1.0, max(0.0, beta))
        self.identity(out, x, np.full(x.size, True) if f0 != 0 else None)

    def op_Clip(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        if self.opset < 11:
            lo = node.attributes.get_float("min", -np.inf)
            hi = node.attributes.get_float("max", np.inf)
        else:
            bounds = []
            for i, default in ((1, -np.inf), (2, np.inf)):
                v = node.inputs[i] if len(node.inputs) > i else None
                if v is None:
                    bounds.append(default)
                    continue
                c = self.const(v)
                if c is None or c.size != 1:
                    raise _Unsupported(f"Clip '{node.name}' bounds are not constant scalars")
                bounds.append(float(c.reshape(-1)[0]))
            lo, hi = bounds
        f0 = min(hi, max(lo, 0.0))
        out = self.alloc(node.outputs[0], x.axis, x.dtype)
        self.identity(out, x, np.full(x.size, True) if f0 != 0 else None)

    def op_PRelu(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        slope = self.const(node.inputs[1])
        if slope is None:
            raise _Unsupported(f"PRelu '{node.name}' slope is not a constant")
        out = self.alloc(node.outputs[0], x.axis, x.dtype)
        self.per_channel_const(node, 1, slope, out)
        self.identity(out, x)

    def per_channel_const(self, node: ir.Node, index: int, array: np.ndarray, out: _Tensor) -> None:
        """Slice a right-aligned broadcast constant along the output's channel axis if it varies there."""
        axis = out.axis - (out.rank - array.ndim)
        if axis < 0 or array.shape[axis] == 1:
            return
        if array.shape[axis] != out.size:
            raise _Unsupported(f"constant input {index} of {node.op_type} '{node.name}' does not broadcast per channel")
        if out.size > 1:
            self.slice_const(node, index, ((axis, out.name),))

    def op_BatchNormalization(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0, axis=1)
        self.only_first_output_used(node)
        if self.attr_int(node, "training_mode", 0):
            raise _Unsupported(f"BatchNormalization '{node.name}' in training mode")
        params = [self.const(v) for v in node.inputs[1:5]]
        if len(params) != 4 or any(p is None or p.shape != (x.size,) for p in params):
            raise _Unsupported(f"BatchNormalization '{node.name}' parameters are not constant per-channel vectors")
        scale, bias, mean, var = (p.astype(np.float64) for p in params)
        eps = node.attributes.get_float("epsilon", 1e-5)
        with np.errstate(all="ignore"):
            f0 = bias - scale * mean / np.sqrt(var + eps)
        if not np.all(np.isfinite(f0)):
            raise _Unsupported(f"BatchNormalization '{node.name}' has non-finite parameters")
        out = self.alloc(node.outputs[0], 1, x.dtype)
        for i in range(1, 5):
            self.slice_const(node, i, ((0, out.name),))
        self.identity(out, x, f0 != 0)

    def op_InstanceNormalization(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0, axis=1)
        scale, bias = self.const(node.inputs[1]), self.const(node.inputs[2])
        if scale is None or bias is None or scale.shape != (x.size,) or bias.shape != (x.size,):
            raise _Unsupported(f"InstanceNormalization '{node.name}' parameters are not constant per-channel vectors")
        out = self.alloc(node.outputs[0], 1, x.dtype)
        self.slice_const(node, 1, ((0, out.name),))
        self.slice_const(node, 2, ((0, out.name),))
        self.identity(out, x, bias != 0)

    def op_pool(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0, axis=1)
        self.only_first_output_used(node)
        out = self.alloc(node.outputs[0], 1, x.dtype)
        self.identity(out, x)

    def reduce_axes(self, node: ir.Node, rank: int) -> list[int] | None:
        if "axes" in node.attributes:
            axes = list(node.attributes.get_ints("axes"))
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            c = self.const(node.inputs[1])
            if c is None:
                raise _Unsupported(f"{node.op_type} '{node.name}' axes are not constant")
            axes = [int(a) for a in np.atleast_1d(c)]
        else:
            axes = []
        if not axes:
            return None  # all axes, or none with noop_with_empty_axes
        return sorted(a % rank for a in axes)

    def op_reduce(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        axes = self.reduce_axes(node, x.rank)
        if axes is None:
            if not self.attr_int(node, "noop_with_empty_axes", 0):
                raise _Unsupported(f"{node.op_type} '{node.name}' reduces over all axes, channels included")
            axes = []
        if x.axis in axes:
            raise _Unsupported(f"{node.op_type} '{node.name}' reduces over the channel axis")
        keep = self.attr_int(node, "keepdims", 1)
        axis = x.axis if keep else x.axis - sum(a < x.axis for a in axes)
        out = self.alloc(node.outputs[0], axis, x.dtype)
        self.identity(out, x)

    def op_elementwise(self, node: ir.Node) -> None:
        op = node.op_type
        out_dims = self.dims(node.outputs[0])
        rank = len(out_dims)
        acts, consts = [], []
        for i, value in enumerate(node.inputs):
            kind = self.kind(value)
            if kind == "tensor":
                t = self.t(value)
                acts.append((i, t, t.axis + rank - t.rank, self.dims(value)))
            elif kind == "const":
                consts.append((i, self.const(value)))
            else:
                raise _Unsupported(f"input {i} of {op} '{node.name}' is missing")
        members = [(i, t, a) for i, t, a, _ in acts if t.size == out_dims[a]]
        axes = {a for _, _, a in members}
        if len(axes) != 1:
            raise _Unsupported(f"{op} '{node.name}': cannot resolve the broadcast of channel axes")
        (a_out,) = axes
        size = out_dims[a_out]
        foreign = [(i, t, d) for i, t, a, d in acts if t.size != out_dims[a]]
        for i, t, d in foreign:
            aligned = a_out - (rank - len(d))
            if t.size != 1 or (aligned >= 0 and d[aligned] != 1):
                raise _Unsupported(f"{op} '{node.name}': cannot resolve the broadcast of input {i}")
        for i, array in consts:
            axis = a_out - (rank - array.ndim)
            if array.ndim > rank or (axis >= 0 and array.shape[axis] not in (1, size)):
                raise _Unsupported(f"{op} '{node.name}': constant input {i} does not broadcast per channel")
        if op in ("Div", "Pow") and (len(node.inputs) != 2 or node.inputs[0] is None or self.kind(node.inputs[0]) != "tensor"
                                     or self.kind(node.inputs[1]) != "const" or members[0][0] != 0):
            raise _Unsupported(f"{op} '{node.name}' of an activation by an activation (0/0 is not 0)")
        # f(0) per channel: zeros for member activations, the constants as they are
        zero = np.zeros([1] * rank)
        arrays = []
        for i, value in enumerate(node.inputs):
            c = next((c for j, c in consts if j == i), None)
            arrays.append(zero if c is None else c.astype(np.float64).reshape((1,) * (rank - c.ndim) + c.shape))
        with np.errstate(all="ignore"):
            f0 = arrays[0]
            for arr in arrays[1:]:
                f0 = _BINARY[op](f0, arr)
        if not np.all(np.isfinite(f0)):
            raise _Unsupported(f"{op} '{node.name}' gives a non-finite value on removed channels")
        out = self.alloc(node.outputs[0], a_out, members[0][1].dtype)
        for i, array in consts:
            self.per_channel_const(node, i, array, out)
        sources = []
        for _, t, _ in members:
            self.union(out.ids, t.ids)
            sources.append((t.name, np.arange(t.size)))
        if op == "Mul":
            self.transfers.append(_Transfer(out.name, "and", sources))
            return
        other = tuple(ax for ax in range(rank) if ax != a_out)
        create = np.broadcast_to(np.any(f0 != 0, axis=other).reshape(-1), (size,)).copy()
        if foreign:
            create[:] = True
        self.transfers.append(_Transfer(out.name, "or", sources, create if create.any() else None))

    # --- structure: concat, split, slice, pad, transpose, reshape, resize -------------------

    def op_Concat(self, node: ir.Node) -> None:
        ins = [self.input_tensor(node, i) for i in range(len(node.inputs))]
        rank = ins[0].rank
        axis = self.attr_int(node, "axis", 1) % rank
        if any(t.axis != ins[0].axis or t.rank != rank for t in ins):
            raise _Unsupported(f"Concat '{node.name}' inputs have channels on different axes")
        if axis == ins[0].axis:
            out = self.alloc(node.outputs[0], axis, ins[0].dtype)
            offset, sources = 0, []
            for t in ins:
                self.union(out.ids[offset : offset + t.size], t.ids)
                src = np.full(out.size, -1)
                src[offset : offset + t.size] = np.arange(t.size)
                sources.append((t.name, src))
                offset += t.size
            if offset != out.size:
                raise _Unsupported(f"Concat '{node.name}' output size {out.size} != {offset}")
            self.transfers.append(_Transfer(out.name, "or", sources))
            return
        if any(t.size != ins[0].size for t in ins):
            raise _Unsupported(f"Concat '{node.name}' inputs differ in channels")
        out = self.alloc(node.outputs[0], ins[0].axis, ins[0].dtype)
        for t in ins:
            self.union(out.ids, t.ids)
        self.transfers.append(_Transfer(out.name, "or", [(t.name, np.arange(t.size)) for t in ins]))

    def op_Split(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        axis = self.attr_int(node, "axis", 0) % x.rank
        if axis != x.axis:
            for value in node.outputs:
                self.identity(self.alloc(value, x.axis, x.dtype), x)
            return
        outs = [self.alloc(value, axis, x.dtype) for value in node.outputs]
        if sum(o.size for o in outs) != x.size:
            raise _Unsupported(f"Split '{node.name}' output sizes do not add up")
        has_input = len(node.inputs) > 1 and node.inputs[1] is not None
        if has_input and self.const(node.inputs[1]) is None:
            raise _Unsupported(f"Split '{node.name}' sizes are not constant")
        offset = 0
        for o in outs:
            self.union(o.ids, x.ids[offset : offset + o.size])
            self.transfers.append(_Transfer(o.name, "or", [(x.name, np.arange(offset, offset + o.size))]))
            offset += o.size
        names = [o.name for o in outs]

        def sizes(original, kept, names=names, x=x.name):
            if kept.count(x) == self.tensors[x].size:
                return None
            return np.array([kept.count(n) for n in names], dtype=np.int64)

        if self.opset >= 13:
            original = self.const(node.inputs[1]) if has_input else None
            self.value_edits.append(_ValueEdit(node.name, 1, sizes, original))
            if not has_input and "num_outputs" in node.attributes:  # explicit sizes replace it

                def drop_num_outputs(kept, x=x.name):
                    return {} if kept.count(x) == self.tensors[x].size else {"num_outputs": None}

                self.attr_edits.append(_AttrEdit(node.name, drop_num_outputs))
        else:

            def split_attr(kept, names=names):
                return {"split": ir.AttrInt64s("split", [kept.count(n) for n in names])}

            self.attr_edits.append(_AttrEdit(node.name, split_attr))

    def op_Slice(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        if self.opset < 10:
            starts, ends = node.attributes.get_ints("starts"), node.attributes.get_ints("ends")
            axes = node.attributes.get_ints("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            optional = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
            params = [self.const(v) if v is not None else None for v in optional]
            for i, v in enumerate(node.inputs[1:5]):
                if v is not None and params[i] is None:
                    raise _Unsupported(f"Slice '{node.name}' parameters are not constant")
            starts, ends = params[0].tolist(), params[1].tolist()
            axes = params[2].tolist() if params[2] is not None else list(range(len(starts)))
            steps = params[3].tolist() if params[3] is not None else [1] * len(starts)
        axes = [a % x.rank for a in axes]
        if x.axis not in axes:
            out = self.alloc(node.outputs[0], x.axis, x.dtype)
            self.identity(out, x)
            return
        k = axes.index(x.axis)
        if steps[k] != 1:
            raise _Unsupported(f"Slice '{node.name}' with step {steps[k]} on the channel axis")
        if self.opset < 10:
            raise _Unsupported(f"Slice '{node.name}' (opset < 10) on the channel axis")
        s, e = int(starts[k]), int(ends[k])
        s = max(0, min(s + x.size if s < 0 else s, x.size))
        e = max(0, min(e + x.size if e < 0 else e, x.size))
        out = self.alloc(node.outputs[0], x.axis, x.dtype)
        if out.size != max(0, e - s):
            raise _Unsupported(f"Slice '{node.name}' output size does not match")
        self.union(out.ids, x.ids[s:e])
        self.transfers.append(_Transfer(out.name, "or", [(x.name, np.arange(s, e))]))

        def new_starts(original, kept, s=s, k=k, x=x.name):
            if kept.count(x) == self.tensors[x].size:
                return None
            value = int(kept.mask(x)[:s].sum())
            if value == original[k]:
                return None
            arr = original.copy()
            arr[k] = value
            return arr

        def new_ends(original, kept, e=e, k=k, x=x.name):
            if kept.count(x) == self.tensors[x].size or original[k] >= self.tensors[x].size:
                return None  # slices to the end
            value = int(kept.mask(x)[:e].sum())
            if value == original[k]:
                return None
            arr = original.copy()
            arr[k] = value
            return arr

        self.value_edits.append(_ValueEdit(node.name, 1, new_starts, self.const(node.inputs[1])))
        self.value_edits.append(_ValueEdit(node.name, 2, new_ends, self.const(node.inputs[2])))

    def op_Pad(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        mode = node.attributes.get_string("mode", "constant")
        if self.opset < 11:
            pads = np.array(node.attributes.get_ints("pads"), dtype=np.int64)
            value = node.attributes.get_float("value", 0.0)
            axes = list(range(x.rank))
        else:
            pads = self.const(node.inputs[1])
            if pads is None:
                raise _Unsupported(f"Pad '{node.name}' pads are not constant")
            cv = node.inputs[2] if len(node.inputs) > 2 else None
            value = 0.0
            if cv is not None:
                c = self.const(cv)
                if c is None:
                    raise _Unsupported(f"Pad '{node.name}' value is not constant")
                value = float(c.reshape(-1)[0]) if c.size else 0.0
            av = node.inputs[3] if len(node.inputs) > 3 else None
            if av is not None:
                c = self.const(av)
                if c is None:
                    raise _Unsupported(f"Pad '{node.name}' axes are not constant")
                axes = [int(a) % x.rank for a in c.reshape(-1)]
            else:
                axes = list(range(x.rank))
        n = len(axes)
        begin = {ax: int(pads[i]) for i, ax in enumerate(axes)}
        end = {ax: int(pads[i + n]) for i, ax in enumerate(axes)}
        spatial = any(begin[ax] > 0 or end[ax] > 0 for ax in axes if ax != x.axis)
        create_all = mode == "constant" and value != 0 and spatial
        pb, pe = begin.get(x.axis, 0), end.get(x.axis, 0)
        if pb == 0 and pe == 0:
            out = self.alloc(node.outputs[0], x.axis, x.dtype)
            self.identity(out, x, np.full(x.size, True) if create_all else None)
            return
        if mode != "constant" or pb < 0 or pe < 0:
            raise _Unsupported(f"Pad '{node.name}' on the channel axis in mode {mode} or with negative pads")
        out = self.alloc(node.outputs[0], x.axis, x.dtype)
        if out.size != x.size + pb + pe:
            raise _Unsupported(f"Pad '{node.name}' output size does not match")
        self.union(out.ids[pb : pb + x.size], x.ids)
        src = np.full(out.size, -1)
        src[pb : pb + x.size] = np.arange(x.size)
        create = np.zeros(out.size, dtype=bool)
        create[:pb] = create[pb + x.size :] = value != 0
        if create_all:
            create[:] = True
        self.transfers.append(_Transfer(out.name, "or", [(x.name, src)], create if create.any() else None))
        k = axes.index(x.axis)

        def new_pads(original, kept, o=out.name, pb=pb, pe=pe, k=k, n=n):
            m = kept.mask(o)
            nb, ne = int(m[:pb].sum()), int(m[len(m) - pe :].sum()) if pe else 0
            if nb == pb and ne == pe:
                return None
            arr = np.array(original, copy=True)
            arr[k], arr[k + n] = nb, ne
            return arr

        if self.opset < 11:

            def pads_attr(kept, p=pads):
                new = new_pads(p, kept)
                return {} if new is None else {"pads": ir.AttrInt64s("pads", new.tolist())}

            self.attr_edits.append(_AttrEdit(node.name, pads_attr))
        else:
            self.value_edits.append(_ValueEdit(node.name, 1, new_pads, pads))

    def op_Transpose(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        perm = list(node.attributes.get_ints("perm", list(range(x.rank))[::-1]))
        out = self.alloc(node.outputs[0], perm.index(x.axis), x.dtype)
        self.identity(out, x)

    def reshape_like(self, node: ir.Node) -> tuple[_Tensor, _Tensor, int]:
        x = self.input_tensor(node, 0)
        in_dims, out_dims = self.dims(node.inputs[0]), self.dims(node.outputs[0])
        mapping = _merge_map(in_dims, x.axis, out_dims)
        if mapping is None:
            raise _Unsupported(
                f"{node.op_type} '{node.name}' {in_dims} -> {out_dims} splits the channel axis or merges it with the batch"
            )
        b, inner = mapping
        out = self.alloc(node.outputs[0], b, x.dtype)
        src = (np.arange(out.size) // inner) % x.size
        self.union(out.ids, x.ids[src])
        self.transfers.append(_Transfer(out.name, "or", [(x.name, src)]))
        return x, out, b

    def op_Flatten(self, node: ir.Node) -> None:
        rank = len(self.dims(node.inputs[0]))
        if self.attr_int(node, "axis", 1) % max(rank, 1) == 0 and rank > 0:
            raise _Unsupported(f"Flatten '{node.name}' with axis 0 merges the batch into the channels")
        self.reshape_like(node)

    def op_Squeeze(self, node: ir.Node) -> None:
        self.reshape_like(node)

    def op_Unsqueeze(self, node: ir.Node) -> None:
        self.reshape_like(node)

    def op_Reshape(self, node: ir.Node) -> None:
        target = self.shape_entries(node.inputs[1])
        if target is None:
            raise _Unsupported(f"Reshape '{node.name}' target is not known")
        x, out, b = self.reshape_like(node)
        allowzero = self.attr_int(node, "allowzero", 0)
        entry = target[b] if b < len(target) else None
        if x.axis < len(target) and target[x.axis] == 0 and not allowzero and x.axis != b:
            raise _Unsupported(f"Reshape '{node.name}' copies the channel dim to another axis")
        if entry == -1 or (entry == 0 and not allowzero and b == x.axis and out.size == x.size):
            return
        if not isinstance(entry, int) or entry <= 0 or node.inputs[1].name in self.shape_vals:
            raise _Unsupported(f"Reshape '{node.name}' target fixes the channel count at run time")

        def new_target(original, kept, o=out.name, b=b):
            value = kept.count(o)
            if value == original[b]:
                return None
            arr = original.copy()
            arr[b] = value
            return arr

        self.value_edits.append(_ValueEdit(node.name, 1, new_target, self.const(node.inputs[1])))

    def op_Resize(self, node: ir.Node) -> None:
        x = self.input_tensor(node, 0)
        axes = list(node.attributes.get_ints("axes", list(range(x.rank))))
        axes = [a % x.rank for a in axes]
        if node.op_type == "Upsample" or self.opset < 11:
            index_scales, index_sizes = 1, None
        else:
            index_scales, index_sizes = 2, 3
        scales = node.inputs[index_scales] if len(node.inputs) > index_scales else None
        sizes = node.inputs[index_sizes] if index_sizes is not None and len(node.inputs) > index_sizes else None
        out = self.alloc(node.outputs[0], x.axis, x.dtype)
        k = axes.index(x.axis) if x.axis in axes else None
        if scales is not None and (c := self.const(scales)) is not None and c.size:
            if k is not None and c.reshape(-1)[k] != 1:
                raise _Unsupported(f"{node.op_type} '{node.name}' scales the channel axis")
        elif scales is not None and self.kind(scales) != "const":
            raise _Unsupported(f"{node.op_type} '{node.name}' scales are not constant")
        elif node.op_type == "Upsample" and "scales" in node.attributes:
            if node.attributes.get_floats("scales")[x.axis] != 1:
                raise _Unsupported(f"Upsample '{node.name}' scales the channel axis")
        if sizes is not None:
            c = self.const(sizes)
            if c is None:
                raise _Unsupported(f"Resize '{node.name}' sizes are not constant")
            if k is not None:

                def new_sizes(original, kept, o=out.name, k=k):
                    value = kept.count(o)
                    if value == original[k]:
                        return None
                    arr = original.copy()
                    arr[k] = value
                    return arr

                self.value_edits.append(_ValueEdit(node.name, index_sizes, new_sizes, c))
        if out.size != x.size:
            raise _Unsupported(f"{node.op_type} '{node.name}' changes the channel count")
        self.identity(out, x)

    op_Upsample = op_Resize

    # --- components, groups, sites, cost -------------------------------------------------------

    def finish(self) -> ChannelAnalysis:
        n = self.n
        labels = _components(n, self.edges)
        roots, element_group = np.unique(labels, return_inverse=True)
        element_group = element_group.reshape(-1)
        n_groups = len(roots)
        reason: list[str | None] = [None] * n_groups
        for ids, why in self.bad:
            for g in np.unique(element_group[ids]):
                if reason[g] is None:
                    reason[g] = why
        has_producer = np.zeros(n_groups, dtype=bool)
        for _, name in self.producer_rows:
            has_producer[element_group[self.tensors[name].ids]] = True
        for g in np.flatnonzero(~has_producer):
            if reason[g] is None:
                reason[g] = "no Conv/Gemm/MatMul produces these channels"
        prunable = np.array([r is None for r in reason], dtype=bool)
        plan = self.plan(element_group, prunable)
        sites = self.choose_sites(plan)
        groups = self.groups(element_group, prunable, reason)
        return ChannelAnalysis(groups, sites, plan)

    def groups(self, element_group: np.ndarray, prunable: np.ndarray, reason: list[str | None]) -> list[ChannelGroup]:
        n_groups = len(prunable)
        elements: list[dict[str, list[int]]] = [{} for _ in range(n_groups)]
        for t in self.tensors.values():
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
        records = ((self.producer_rows, producers), (self.consumer_cols, consumers), (self.depthwise, depthwise))
        for rows, lists in records:
            for node, name in rows:
                for g in np.unique(element_group[self.tensors[name].ids]):
                    lists[g].append(node)
        return [
            ChannelGroup(int(g), elements[g], producers[g], consumers[g], bool(prunable[g]), reason[g], depthwise[g])
            for g in range(n_groups)
        ]

    def choose_sites(self, plan: _Plan) -> list[GateSite]:
        """Producer outputs, then tensors where a removed channel turns non-zero before a consumer
        reads it: add the origins of such violations until there are none, then drop the added
        sites that the others make unnecessary (latest first)."""
        prunable_el = plan.prunable[plan.element_group]
        producers = {name for _, name in self.producer_rows if prunable_el[self.tensors[name].ids].any()}
        sites = set(producers)
        while True:
            status, origin = self.propagate(sites)
            new = self.violations(status, origin, prunable_el, self.sinks) - sites
            if not new:
                break
            sites |= new
        position = {tr.out: i for i, tr in enumerate(self.transfers)}
        sinks = set(self.sinks)
        for name in sorted(sites - producers, key=lambda n: -self.tensors[n].index):
            if not self.needed(name, sites, status, position[name], prunable_el, sinks):
                sites.discard(name)
                status, _ = self.propagate(sites)
        return [GateSite(name, t.axis, plan.public_groups(name)) for name, t in self.tensors.items() if name in sites]

    def step(self, tr: _Transfer, status: np.ndarray, origin: np.ndarray, gated: bool) -> tuple[np.ndarray, np.ndarray]:
        """Status and origin of one transfer's output elements (zero everywhere when gated)."""
        t = self.tensors[tr.out]
        if gated:
            return np.zeros(t.size, dtype=bool), np.full(t.size, -1)
        if tr.kind == "fresh":
            return np.ones(t.size, dtype=bool), np.full(t.size, t.index)
        parts = []
        for name, src in tr.sources:
            s = self.tensors[name]
            ids = s.offset + np.maximum(src, 0)
            parts.append((status[ids] & (src >= 0), origin[ids]))
        if tr.kind == "and":  # zero when any operand is: blame the earliest origin
            st = np.logical_and.reduce([p for p, _ in parts])
            return st, np.where(st, np.min([o for _, o in parts], axis=0), -1)
        st = np.zeros(t.size, dtype=bool) if tr.create is None else tr.create.copy()
        org = np.where(st, t.index, -1)
        for s_st, s_org in parts:
            org = np.where(s_st & ~st, s_org, org)
            org = np.where(s_st & st & (org != s_org), t.index, org)
            st = st | s_st
        return st, org

    def propagate(self, sites: set[str]) -> tuple[np.ndarray, np.ndarray]:
        """Zero/non-zero status (and where non-zero values come from) of every element when the
        gates at ``sites`` are 0 for the removed groups."""
        status = np.zeros(self.n, dtype=bool)
        origin = np.full(self.n, -1, dtype=np.int64)
        for tr in self.transfers:
            t = self.tensors[tr.out]
            st, org = self.step(tr, status, origin, tr.out in sites)
            status[t.offset : t.offset + t.size] = st
            origin[t.offset : t.offset + t.size] = org
        return status, origin

    def violations(self, status: np.ndarray, origin: np.ndarray, prunable_el: np.ndarray, sinks: Iterable[str]) -> set[str]:
        """Tensors where the non-zero values of removed channels that reach a consumer come from."""
        names = list(self.tensors)
        found: set[str] = set()
        for name in sinks:
            ids = self.tensors[name].ids
            hit = status[ids] & prunable_el[ids]
            found |= {names[i] for i in np.unique(origin[ids][hit])}
        return found

    def needed(
        self, site: str, sites: set[str], status: np.ndarray, start: int, prunable_el: np.ndarray, sinks: set[str]
    ) -> bool:
        """Whether a consumer would read non-zero values of removed channels without ``site``:
        recompute only the transfers downstream of it whose inputs changed."""
        status = status.copy()
        origin = np.zeros(self.n, dtype=np.int64)  # origins do not matter here
        dirty = set()
        for tr in self.transfers[start:]:
            if tr.out != site and not any(name in dirty for name, _ in tr.sources):
                continue
            t = self.tensors[tr.out]
            st, _ = self.step(tr, status, origin, tr.out in sites and tr.out != site)
            sl = slice(t.offset, t.offset + t.size)
            if np.array_equal(st, status[sl]):
                continue
            status[sl] = st
            dirty.add(tr.out)
            if tr.out in sinks and (st & prunable_el[sl]).any():
                return True
        return any((status[self.tensors[n].ids] & prunable_el[self.tensors[n].ids]).any() for n in sinks & dirty)

    def plan(self, element_group: np.ndarray, prunable: np.ndarray) -> _Plan:
        tensors = self.tensors
        dummy = len(tensors)
        index = {name: t.index for name, t in tensors.items()}
        # initializer uses, for sharing
        edit_inits: dict[tuple[str, int], str] = {}
        init_arrays: dict[str, np.ndarray] = {}
        init_uses: dict[str, int] = {}
        nodes = {node.name: node for node in self.graph}
        for edit in [*self.slice_edits, *self.value_edits]:
            node = nodes[edit.node]
            value = node.inputs[edit.index] if edit.index < len(node.inputs) else None
            if value is None:
                continue
            edit_inits[(edit.node, edit.index)] = value.name
            init_arrays[value.name] = self.const(value)
            init_uses[value.name] = len(value.uses())
        edits_per_init: dict[str, int] = {}
        for key in edit_inits.values():
            edits_per_init[key] = edits_per_init.get(key, 0) + 1
        shared = sorted(k for k in init_arrays if init_uses[k] != 1 or edits_per_init[k] != 1)
        shared_set = set(shared)
        param_terms = []
        for edit in self.slice_edits:
            key = edit_inits[(edit.node, edit.index)]
            if key in shared_set:
                continue
            axes = [a for a, _ in edit.axes]
            if len(axes) > 2:
                raise AssertionError("constant sliced along more than two axes")
            ta = index[edit.axes[0][1]]
            tb = index[edit.axes[1][1]] if len(edit.axes) > 1 else dummy
            size = _prod(edit.shape)
            param_terms.append((ta, tb, size // _prod(edit.shape[a] for a in axes), size))
        # MACs: the nodes we model, others fixed
        fixed, mac_terms = 0, []
        for node in self.graph:
            if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx"):
                continue
            macs = node_macs(node, self.shapes)
            term = self.mac_nodes.get(node.name)
            if term is not None:
                out, inp, factor = term
                ta, tb = index[out], index[inp] if inp is not None else dummy
                full = factor * tensors[out].size * (tensors[inp].size if inp is not None else 1)
                if full == macs and macs > 0:
                    mac_terms.append((ta, tb, factor))
                    continue
            fixed += macs
        # (tensor, group, count) of prunable elements
        pt, pg, pc = [], [], []
        for t in tensors.values():
            g = element_group[t.offset : t.offset + t.size]
            g = g[prunable[g]]
            if len(g):
                u, c = np.unique(g, return_counts=True)
                pt.append(np.full(len(u), t.index))
                pg.append(u)
                pc.append(c)
        cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)  # noqa: E731
        return _Plan(
            tensors=tensors,
            element_group=element_group,
            prunable=prunable,
            slice_edits=self.slice_edits,
            value_edits=self.value_edits,
            attr_edits=self.attr_edits,
            layers=self.layers,
            init_uses=init_uses,
            edit_inits=edit_inits,
            init_arrays=init_arrays,
            base_params=count_params(self.model),
            fixed_macs=fixed,
            mac_terms=np.array(mac_terms, dtype=np.int64).reshape(-1, 3),
            param_terms=np.array(param_terms, dtype=np.int64).reshape(-1, 4),
            shared_inits=shared,
            slow_keys=shared + [f"<new>{e.node}:{e.index}" for e in self.value_edits if e.original is None],
            sizes=np.array([t.size for t in tensors.values()] + [1], dtype=np.int64),
            pair_tensor=cat(pt, np.int64),
            pair_group=cat(pg, np.int64),
            pair_count=cat(pc, np.float64),
        )


def _components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected-component labels (the smallest element id of each component)."""
    parent = np.arange(n, dtype=np.int64)
    if not edges:
        return parent
    u = np.concatenate([a for a, _ in edges])
    v = np.concatenate([b for _, b in edges])
    while True:
        pu, pv = parent[u], parent[v]
        lo, hi = np.minimum(pu, pv), np.maximum(pu, pv)
        diff = lo != hi
        if not diff.any():
            return parent
        np.minimum.at(parent, hi[diff], lo[diff])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
