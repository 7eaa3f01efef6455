"""What each op does to channels: one handler per op type, looked up in :data:`OPS` (the way
``calibration/interpreter.py`` maps ops to Torch code and Torch-Pruning maps layer types to
pruners).

A handler takes the :class:`~.walk.Walker` and the node, allocates the node's output tensors and
records their coupling (``union``), their zero/non-zero status transfer (:class:`~.records.Transfer`),
the constant edits a removal needs (:class:`~.records.SliceEdit`, :class:`~.records.ValueEdit`,
:class:`~.records.AttrEdit`) and the MAC terms of compute nodes; it raises
:class:`~.records.Unsupported` where it cannot prove a removal exact.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ..basis.layers import fc_dims
from .records import AttrEdit, SliceEdit, Tensor, Transfer, Unsupported, ValueEdit, prod
from .walk import Handler, Walker

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


def _with_entry(original: np.ndarray, k: int, value: int) -> np.ndarray | None:
    """A constant shape/index array with entry ``k`` set to ``value`` (None: already so), for the
    value edits that follow the channels kept."""
    if value == original[k]:
        return None
    arr = original.copy()
    arr[k] = value
    return arr


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
                    return b, prod(in_dims[a + 1 : i1])
    return None


# ---------------------------------------------------------------------------------------------
# Compute nodes


def conv(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0, axis=1)
    w = walk.const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        raise Unsupported(f"Conv '{node.name}' weight is not a constant")
    b_value = node.inputs[2] if len(node.inputs) > 2 else None
    b = walk.const(b_value)
    if b_value is not None and b is None:
        raise Unsupported(f"Conv '{node.name}' bias is not a constant")
    group = walk.attr_int(node, "group", 1)
    if w.ndim != x.rank or x.size != w.shape[1] * group:
        raise Unsupported(f"Conv '{node.name}' weight {w.shape} does not match input channels {x.size}")
    out = walk.alloc(node.outputs[0], 1, node.inputs[1].dtype)
    out_dims = walk.dims(node.outputs[0])
    factor = prod(out_dims) // out.size * prod(w.shape[2:])
    walk.layers[node.name] = (out.name, x.name)
    if group == 1:
        walk.producer_rows.append((node.name, out.name))
        walk.consumer_cols.append((node.name, x.name))
        walk.transfers.append(Transfer(out.name, "fresh", []))
        walk.sinks.append(x.name)
        slice_const(walk, node, 1, ((0, out.name), (1, x.name)))
        walk.mac_nodes[node.name] = (out.name, x.name, factor)
    elif group == x.size == out.size and w.shape[1] == 1:
        walk.depthwise.append((node.name, out.name))
        walk.identity(out, x, None if b is None else (b != 0))
        slice_const(walk, node, 1, ((0, out.name),))
        group_attr = lambda kept, o=out.name: {"group": ir.AttrInt64("group", kept.count(o))}  # noqa: E731
        walk.attr_edits.append(AttrEdit(node.name, group_attr))
        walk.mac_nodes[node.name] = (out.name, None, factor)
    else:
        reason = f"grouped Conv '{node.name}' (group={group})"
        walk.mark_bad(x, reason)
        walk.mark_bad(out, reason)
        return
    if b is not None:
        slice_const(walk, node, 2, ((0, out.name),))


def gemm(walk: Walker, node: ir.Node) -> None:
    a = walk.input_tensor(node, 0, axis=1)
    if a.rank != 2 or walk.attr_int(node, "transA", 0):
        raise Unsupported(f"Gemm '{node.name}' with transA=1 or input of rank {a.rank}")
    w = walk.const(node.inputs[1])
    if w is None or w.ndim != 2:
        raise Unsupported(f"Gemm '{node.name}' B is not a constant matrix")
    trans_b = walk.attr_int(node, "transB", 0)
    if fc_dims(node, w.shape)[1] != a.size:
        raise Unsupported(f"Gemm '{node.name}' B {w.shape} does not match input features {a.size}")
    c_value = node.inputs[2] if len(node.inputs) > 2 else None
    c = walk.const(c_value)
    if c_value is not None and c is None:
        raise Unsupported(f"Gemm '{node.name}' C is not a constant")
    out = walk.alloc(node.outputs[0], 1, node.inputs[1].dtype)
    walk.layers[node.name] = (out.name, a.name)
    walk.producer_rows.append((node.name, out.name))
    walk.consumer_cols.append((node.name, a.name))
    walk.transfers.append(Transfer(out.name, "fresh", []))
    walk.sinks.append(a.name)
    slice_const(walk, node, 1, ((0, out.name), (1, a.name)) if trans_b else ((0, a.name), (1, out.name)))
    if c is not None and c.ndim >= 1 and c.shape[-1] == out.size and out.size > 1:
        slice_const(walk, node, 2, ((c.ndim - 1, out.name),))
    walk.mac_nodes[node.name] = (out.name, a.name, walk.dims(node.outputs[0])[0])


def matmul(walk: Walker, node: ir.Node) -> None:
    if walk.kind(node.inputs[1]) == "tensor":
        x = walk.t(node.inputs[0]) if walk.kind(node.inputs[0]) == "tensor" else None
        reason = f"MatMul '{node.name}' between two activations"
        for t in (x, walk.t(node.inputs[1])):
            if t is not None:
                walk.mark_bad(t, reason)
        raise Unsupported(reason)
    x = walk.input_tensor(node, 0)
    w = walk.const(node.inputs[1])
    if w is None or w.ndim != 2 or x.axis != x.rank - 1 or w.shape[0] != x.size:
        raise Unsupported(f"MatMul '{node.name}' is not activation (..., K) x constant (K, N)")
    out = walk.alloc(node.outputs[0], -1, node.inputs[1].dtype)
    walk.layers[node.name] = (out.name, x.name)
    walk.producer_rows.append((node.name, out.name))
    walk.consumer_cols.append((node.name, x.name))
    walk.transfers.append(Transfer(out.name, "fresh", []))
    walk.sinks.append(x.name)
    slice_const(walk, node, 1, ((0, x.name), (1, out.name)))
    walk.mac_nodes[node.name] = (out.name, x.name, prod(walk.dims(node.outputs[0])[:-1]))

# ---------------------------------------------------------------------------------------------
# Per-channel ops


def unary(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    op = node.op_type
    if op == "Dropout":
        only_first_output_used(node)
        mode = walk.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.array(False)
        if mode is None or bool(mode):
            raise Unsupported(f"Dropout '{node.name}' may be in training mode")
    dtype = ir.DataType(walk.attr_int(node, "to", 1)) if op == "Cast" else x.dtype
    out = walk.alloc(node.outputs[0], x.axis, dtype)
    f0 = _CREATE_UNARY.get(op, 0.0)
    walk.identity(out, x, np.full(x.size, True) if f0 != 0 else None)


def hard_sigmoid(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    out = walk.alloc(node.outputs[0], x.axis, x.dtype)
    beta = node.attributes.get_float("beta", 0.5)
    f0 = min(1.0, max(0.0, beta))
    walk.identity(out, x, np.full(x.size, True) if f0 != 0 else None)


def clip(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    if walk.opset < 11:
        lo = node.attributes.get_float("min", -np.inf)
        hi = node.attributes.get_float("max", np.inf)
    else:
        bounds = []
        for i, default in ((1, -np.inf), (2, np.inf)):
            v = node.inputs[i] if len(node.inputs) > i else None
            if v is None:
                bounds.append(default)
                continue
            c = walk.const(v)
            if c is None or c.size != 1:
                raise Unsupported(f"Clip '{node.name}' bounds are not constant scalars")
            bounds.append(float(c.reshape(-1)[0]))
        lo, hi = bounds
    f0 = min(hi, max(lo, 0.0))
    out = walk.alloc(node.outputs[0], x.axis, x.dtype)
    walk.identity(out, x, np.full(x.size, True) if f0 != 0 else None)


def prelu(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    slope = walk.const(node.inputs[1])
    if slope is None:
        raise Unsupported(f"PRelu '{node.name}' slope is not a constant")
    out = walk.alloc(node.outputs[0], x.axis, x.dtype)
    per_channel_const(walk, node, 1, slope, out)
    walk.identity(out, x)


def per_channel_const(walk: Walker, node: ir.Node, index: int, array: np.ndarray, out: Tensor) -> None:
    """Slice a right-aligned broadcast constant along the output's channel axis if it varies there."""
    axis = out.axis - (out.rank - array.ndim)
    if axis < 0 or array.shape[axis] == 1:
        return
    if array.shape[axis] != out.size:
        raise Unsupported(f"constant input {index} of {node.op_type} '{node.name}' does not broadcast per channel")
    if out.size > 1:
        slice_const(walk, node, index, ((axis, out.name),))


def batch_normalization(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0, axis=1)
    only_first_output_used(node)
    if walk.attr_int(node, "training_mode", 0):
        raise Unsupported(f"BatchNormalization '{node.name}' in training mode")
    params = [walk.const(v) for v in node.inputs[1:5]]
    if len(params) != 4 or any(p is None or p.shape != (x.size,) for p in params):
        raise Unsupported(f"BatchNormalization '{node.name}' parameters are not constant per-channel vectors")
    scale, bias, mean, var = (p.astype(np.float64) for p in params)
    eps = node.attributes.get_float("epsilon", 1e-5)
    with np.errstate(all="ignore"):
        f0 = bias - scale * mean / np.sqrt(var + eps)
    if not np.all(np.isfinite(f0)):
        raise Unsupported(f"BatchNormalization '{node.name}' has non-finite parameters")
    out = walk.alloc(node.outputs[0], 1, x.dtype)
    for i in range(1, 5):
        slice_const(walk, node, i, ((0, out.name),))
    walk.identity(out, x, f0 != 0)


def instance_normalization(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0, axis=1)
    scale, bias = walk.const(node.inputs[1]), walk.const(node.inputs[2])
    if scale is None or bias is None or scale.shape != (x.size,) or bias.shape != (x.size,):
        raise Unsupported(f"InstanceNormalization '{node.name}' parameters are not constant per-channel vectors")
    out = walk.alloc(node.outputs[0], 1, x.dtype)
    slice_const(walk, node, 1, ((0, out.name),))
    slice_const(walk, node, 2, ((0, out.name),))
    walk.identity(out, x, bias != 0)


def pool(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0, axis=1)
    only_first_output_used(node)
    out = walk.alloc(node.outputs[0], 1, x.dtype)
    walk.identity(out, x)


def reduce_axes(walk: Walker, node: ir.Node, rank: int) -> list[int] | None:
    if "axes" in node.attributes:
        axes = list(node.attributes.get_ints("axes"))
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        c = walk.const(node.inputs[1])
        if c is None:
            raise Unsupported(f"{node.op_type} '{node.name}' axes are not constant")
        axes = [int(a) for a in np.atleast_1d(c)]
    else:
        axes = []
    if not axes:
        return None  # all axes, or none with noop_with_empty_axes
    return sorted(a % rank for a in axes)


def reduce(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    axes = reduce_axes(walk, node, x.rank)
    if axes is None:
        if not walk.attr_int(node, "noop_with_empty_axes", 0):
            raise Unsupported(f"{node.op_type} '{node.name}' reduces over all axes, channels included")
        axes = []
    if x.axis in axes:
        raise Unsupported(f"{node.op_type} '{node.name}' reduces over the channel axis")
    keep = walk.attr_int(node, "keepdims", 1)
    axis = x.axis if keep else x.axis - sum(a < x.axis for a in axes)
    out = walk.alloc(node.outputs[0], axis, x.dtype)
    walk.identity(out, x)


def elementwise(walk: Walker, node: ir.Node) -> None:
    op = node.op_type
    out_dims = walk.dims(node.outputs[0])
    rank = len(out_dims)
    acts, consts = [], []
    for i, value in enumerate(node.inputs):
        kind = walk.kind(value)
        if kind == "tensor":
            t = walk.t(value)
            acts.append((i, t, t.axis + rank - t.rank, walk.dims(value)))
        elif kind == "const":
            consts.append((i, walk.const(value)))
        else:
            raise Unsupported(f"input {i} of {op} '{node.name}' is missing")
    members = [(i, t, a) for i, t, a, _ in acts if t.size == out_dims[a]]
    axes = {a for _, _, a in members}
    if len(axes) != 1:
        raise Unsupported(f"{op} '{node.name}': cannot resolve the broadcast of channel axes")
    (a_out,) = axes
    size = out_dims[a_out]
    foreign = [(i, t, d) for i, t, a, d in acts if t.size != out_dims[a]]
    for i, t, d in foreign:
        aligned = a_out - (rank - len(d))
        if t.size != 1 or (aligned >= 0 and d[aligned] != 1):
            raise Unsupported(f"{op} '{node.name}': cannot resolve the broadcast of input {i}")
    for i, array in consts:
        axis = a_out - (rank - array.ndim)
        if array.ndim > rank or (axis >= 0 and array.shape[axis] not in (1, size)):
            raise Unsupported(f"{op} '{node.name}': constant input {i} does not broadcast per channel")
    if op in ("Div", "Pow") and (len(node.inputs) != 2 or node.inputs[0] is None or walk.kind(node.inputs[0]) != "tensor"
                                 or walk.kind(node.inputs[1]) != "const" or members[0][0] != 0):
        raise Unsupported(f"{op} '{node.name}' of an activation by an activation (0/0 is not 0)")
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
        raise Unsupported(f"{op} '{node.name}' gives a non-finite value on removed channels")
    out = walk.alloc(node.outputs[0], a_out, members[0][1].dtype)
    for i, array in consts:
        per_channel_const(walk, node, i, array, out)
    sources = []
    for _, t, _ in members:
        walk.union(out.ids, t.ids)
        sources.append((t.name, np.arange(t.size)))
    if op == "Mul":
        walk.transfers.append(Transfer(out.name, "and", sources))
        return
    other = tuple(ax for ax in range(rank) if ax != a_out)
    create = np.broadcast_to(np.any(f0 != 0, axis=other).reshape(-1), (size,)).copy()
    if foreign:
        create[:] = True
    walk.transfers.append(Transfer(out.name, "or", sources, create if create.any() else None))

# ---------------------------------------------------------------------------------------------
# Structure: concat, split, slice, pad, transpose, reshape, resize


def concat(walk: Walker, node: ir.Node) -> None:
    ins = [walk.input_tensor(node, i) for i in range(len(node.inputs))]
    rank = ins[0].rank
    axis = walk.attr_int(node, "axis", 1) % rank
    if any(t.axis != ins[0].axis or t.rank != rank for t in ins):
        raise Unsupported(f"Concat '{node.name}' inputs have channels on different axes")
    if axis == ins[0].axis:
        out = walk.alloc(node.outputs[0], axis, ins[0].dtype)
        offset, sources = 0, []
        for t in ins:
            walk.union(out.ids[offset : offset + t.size], t.ids)
            src = np.full(out.size, -1)
            src[offset : offset + t.size] = np.arange(t.size)
            sources.append((t.name, src))
            offset += t.size
        if offset != out.size:
            raise Unsupported(f"Concat '{node.name}' output size {out.size} != {offset}")
        walk.transfers.append(Transfer(out.name, "or", sources))
        return
    if any(t.size != ins[0].size for t in ins):
        raise Unsupported(f"Concat '{node.name}' inputs differ in channels")
    out = walk.alloc(node.outputs[0], ins[0].axis, ins[0].dtype)
    for t in ins:
        walk.union(out.ids, t.ids)
    walk.transfers.append(Transfer(out.name, "or", [(t.name, np.arange(t.size)) for t in ins]))


def split(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    axis = walk.attr_int(node, "axis", 0) % x.rank
    if axis != x.axis:
        for value in node.outputs:
            walk.identity(walk.alloc(value, x.axis, x.dtype), x)
        return
    outs = [walk.alloc(value, axis, x.dtype) for value in node.outputs]
    if sum(o.size for o in outs) != x.size:
        raise Unsupported(f"Split '{node.name}' output sizes do not add up")
    has_input = len(node.inputs) > 1 and node.inputs[1] is not None
    if has_input and walk.const(node.inputs[1]) is None:
        raise Unsupported(f"Split '{node.name}' sizes are not constant")
    offset = 0
    for o in outs:
        walk.union(o.ids, x.ids[offset : offset + o.size])
        walk.transfers.append(Transfer(o.name, "or", [(x.name, np.arange(offset, offset + o.size))]))
        offset += o.size
    names = [o.name for o in outs]

    def sizes(original, kept, names=names, x=x.name):
        if kept.count(x) == walk.tensors[x].size:
            return None
        return np.array([kept.count(n) for n in names], dtype=np.int64)

    if walk.opset >= 13:
        original = walk.const(node.inputs[1]) if has_input else None
        walk.value_edits.append(ValueEdit(node.name, 1, sizes, original))
        if not has_input and "num_outputs" in node.attributes:  # explicit sizes replace it

            def drop_num_outputs(kept, x=x.name):
                return {} if kept.count(x) == walk.tensors[x].size else {"num_outputs": None}

            walk.attr_edits.append(AttrEdit(node.name, drop_num_outputs))
    else:

        def split_attr(kept, names=names):
            return {"split": ir.AttrInt64s("split", [kept.count(n) for n in names])}

        walk.attr_edits.append(AttrEdit(node.name, split_attr))


def slice_(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    if walk.opset < 10:
        starts, ends = node.attributes.get_ints("starts"), node.attributes.get_ints("ends")
        axes = node.attributes.get_ints("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        optional = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
        params = [walk.const(v) if v is not None else None for v in optional]
        for i, v in enumerate(node.inputs[1:5]):
            if v is not None and params[i] is None:
                raise Unsupported(f"Slice '{node.name}' parameters are not constant")
        starts, ends = params[0].tolist(), params[1].tolist()
        axes = params[2].tolist() if params[2] is not None else list(range(len(starts)))
        steps = params[3].tolist() if params[3] is not None else [1] * len(starts)
    axes = [a % x.rank for a in axes]
    if x.axis not in axes:
        out = walk.alloc(node.outputs[0], x.axis, x.dtype)
        walk.identity(out, x)
        return
    k = axes.index(x.axis)
    if steps[k] != 1:
        raise Unsupported(f"Slice '{node.name}' with step {steps[k]} on the channel axis")
    if walk.opset < 10:
        raise Unsupported(f"Slice '{node.name}' (opset < 10) on the channel axis")
    s, e = int(starts[k]), int(ends[k])
    s = max(0, min(s + x.size if s < 0 else s, x.size))
    e = max(0, min(e + x.size if e < 0 else e, x.size))
    out = walk.alloc(node.outputs[0], x.axis, x.dtype)
    if out.size != max(0, e - s):
        raise Unsupported(f"Slice '{node.name}' output size does not match")
    walk.union(out.ids, x.ids[s:e])
    walk.transfers.append(Transfer(out.name, "or", [(x.name, np.arange(s, e))]))

    def new_starts(original, kept, s=s, k=k, x=x.name):
        if kept.count(x) == walk.tensors[x].size:
            return None
        return _with_entry(original, k, int(kept.mask(x)[:s].sum()))

    def new_ends(original, kept, e=e, k=k, x=x.name):
        if kept.count(x) == walk.tensors[x].size or original[k] >= walk.tensors[x].size:
            return None  # slices to the end
        return _with_entry(original, k, int(kept.mask(x)[:e].sum()))

    walk.value_edits.append(ValueEdit(node.name, 1, new_starts, walk.const(node.inputs[1])))
    walk.value_edits.append(ValueEdit(node.name, 2, new_ends, walk.const(node.inputs[2])))


def pad(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    mode = node.attributes.get_string("mode", "constant")
    if walk.opset < 11:
        pads = np.array(node.attributes.get_ints("pads"), dtype=np.int64)
        value = node.attributes.get_float("value", 0.0)
        axes = list(range(x.rank))
    else:
        pads = walk.const(node.inputs[1])
        if pads is None:
            raise Unsupported(f"Pad '{node.name}' pads are not constant")
        cv = node.inputs[2] if len(node.inputs) > 2 else None
        value = 0.0
        if cv is not None:
            c = walk.const(cv)
            if c is None:
                raise Unsupported(f"Pad '{node.name}' value is not constant")
            value = float(c.reshape(-1)[0]) if c.size else 0.0
        av = node.inputs[3] if len(node.inputs) > 3 else None
        if av is not None:
            c = walk.const(av)
            if c is None:
                raise Unsupported(f"Pad '{node.name}' axes are not constant")
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
        out = walk.alloc(node.outputs[0], x.axis, x.dtype)
        walk.identity(out, x, np.full(x.size, True) if create_all else None)
        return
    if mode != "constant" or pb < 0 or pe < 0:
        raise Unsupported(f"Pad '{node.name}' on the channel axis in mode {mode} or with negative pads")
    out = walk.alloc(node.outputs[0], x.axis, x.dtype)
    if out.size != x.size + pb + pe:
        raise Unsupported(f"Pad '{node.name}' output size does not match")
    walk.union(out.ids[pb : pb + x.size], x.ids)
    src = np.full(out.size, -1)
    src[pb : pb + x.size] = np.arange(x.size)
    create = np.zeros(out.size, dtype=bool)
    create[:pb] = create[pb + x.size :] = value != 0
    if create_all:
        create[:] = True
    walk.transfers.append(Transfer(out.name, "or", [(x.name, src)], create if create.any() else None))
    k = axes.index(x.axis)

    def new_pads(original, kept, o=out.name, pb=pb, pe=pe, k=k, n=n):
        m = kept.mask(o)
        nb, ne = int(m[:pb].sum()), int(m[len(m) - pe :].sum()) if pe else 0
        if nb == pb and ne == pe:
            return None
        arr = np.array(original, copy=True)
        arr[k], arr[k + n] = nb, ne
        return arr

    if walk.opset < 11:

        def pads_attr(kept, p=pads):
            new = new_pads(p, kept)
            return {} if new is None else {"pads": ir.AttrInt64s("pads", new.tolist())}

        walk.attr_edits.append(AttrEdit(node.name, pads_attr))
    else:
        walk.value_edits.append(ValueEdit(node.name, 1, new_pads, pads))


def transpose(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    perm = list(node.attributes.get_ints("perm", list(range(x.rank))[::-1]))
    out = walk.alloc(node.outputs[0], perm.index(x.axis), x.dtype)
    walk.identity(out, x)


def reshape_like(walk: Walker, node: ir.Node) -> tuple[Tensor, Tensor, int]:
    x = walk.input_tensor(node, 0)
    in_dims, out_dims = walk.dims(node.inputs[0]), walk.dims(node.outputs[0])
    mapping = _merge_map(in_dims, x.axis, out_dims)
    if mapping is None:
        raise Unsupported(
            f"{node.op_type} '{node.name}' {in_dims} -> {out_dims} splits the channel axis or merges it with the batch"
        )
    b, inner = mapping
    out = walk.alloc(node.outputs[0], b, x.dtype)
    src = (np.arange(out.size) // inner) % x.size
    walk.union(out.ids, x.ids[src])
    walk.transfers.append(Transfer(out.name, "or", [(x.name, src)]))
    return x, out, b


def flatten(walk: Walker, node: ir.Node) -> None:
    rank = len(walk.dims(node.inputs[0]))
    if walk.attr_int(node, "axis", 1) % max(rank, 1) == 0 and rank > 0:
        raise Unsupported(f"Flatten '{node.name}' with axis 0 merges the batch into the channels")
    reshape_like(walk, node)


def squeeze(walk: Walker, node: ir.Node) -> None:
    reshape_like(walk, node)


def unsqueeze(walk: Walker, node: ir.Node) -> None:
    reshape_like(walk, node)


def reshape(walk: Walker, node: ir.Node) -> None:
    target = walk.shape_entries(node.inputs[1])
    if target is None:
        raise Unsupported(f"Reshape '{node.name}' target is not known")
    x, out, b = reshape_like(walk, node)
    allowzero = walk.attr_int(node, "allowzero", 0)
    entry = target[b] if b < len(target) else None
    if x.axis < len(target) and target[x.axis] == 0 and not allowzero and x.axis != b:
        raise Unsupported(f"Reshape '{node.name}' copies the channel dim to another axis")
    if entry == -1 or (entry == 0 and not allowzero and b == x.axis and out.size == x.size):
        return
    if not isinstance(entry, int) or entry <= 0 or node.inputs[1].name in walk.shape_vals:
        raise Unsupported(f"Reshape '{node.name}' target fixes the channel count at run time")

    def new_target(original, kept, o=out.name, b=b):
        return _with_entry(original, b, kept.count(o))

    walk.value_edits.append(ValueEdit(node.name, 1, new_target, walk.const(node.inputs[1])))


def resize(walk: Walker, node: ir.Node) -> None:
    x = walk.input_tensor(node, 0)
    axes = list(node.attributes.get_ints("axes", list(range(x.rank))))
    axes = [a % x.rank for a in axes]
    if node.op_type == "Upsample" or walk.opset < 11:
        index_scales, index_sizes = 1, None
    else:
        index_scales, index_sizes = 2, 3
    scales = node.inputs[index_scales] if len(node.inputs) > index_scales else None
    sizes = node.inputs[index_sizes] if index_sizes is not None and len(node.inputs) > index_sizes else None
    out = walk.alloc(node.outputs[0], x.axis, x.dtype)
    k = axes.index(x.axis) if x.axis in axes else None
    if scales is not None and (c := walk.const(scales)) is not None and c.size:
        if k is not None and c.reshape(-1)[k] != 1:
            raise Unsupported(f"{node.op_type} '{node.name}' scales the channel axis")
    elif scales is not None and walk.kind(scales) != "const":
        raise Unsupported(f"{node.op_type} '{node.name}' scales are not constant")
    elif node.op_type == "Upsample" and "scales" in node.attributes:
        if node.attributes.get_floats("scales")[x.axis] != 1:
            raise Unsupported(f"Upsample '{node.name}' scales the channel axis")
    if sizes is not None:
        c = walk.const(sizes)
        if c is None:
            raise Unsupported(f"Resize '{node.name}' sizes are not constant")
        if k is not None:

            def new_sizes(original, kept, o=out.name, k=k):
                return _with_entry(original, k, kept.count(o))

            walk.value_edits.append(ValueEdit(node.name, index_sizes, new_sizes, c))
    if out.size != x.size:
        raise Unsupported(f"{node.op_type} '{node.name}' changes the channel count")
    walk.identity(out, x)


# ---------------------------------------------------------------------------------------------
# Helpers


def slice_const(walk: Walker, node: ir.Node, index: int, axes: tuple[tuple[int, str], ...]) -> None:
    """Record that constant input ``index`` is sliced along ``axes`` (constant axis, tensor) by a removal."""
    array = walk.const(node.inputs[index])
    walk.slice_edits.append(SliceEdit(node.name, index, axes, tuple(array.shape)))


def only_first_output_used(node: ir.Node) -> None:
    """Raise :class:`Unsupported` when another output than the first is used."""
    for out in node.outputs[1:]:
        if out.uses() or out.is_graph_output():
            raise Unsupported(f"output {out.name} of {node.op_type} '{node.name}' is used")


# ---------------------------------------------------------------------------------------------
# The op table

OPS: dict[str, Handler] = {
    **{op: unary for op in (*_ZERO_UNARY, *_CREATE_UNARY)},
    **{op: pool for op in _POOLS},
    **{op: reduce for op in _REDUCE},
    **{op: elementwise for op in _BINARY},
    "Conv": conv, "Gemm": gemm, "MatMul": matmul,
    "HardSigmoid": hard_sigmoid, "Clip": clip, "PRelu": prelu,
    "BatchNormalization": batch_normalization, "InstanceNormalization": instance_normalization,
    "Concat": concat, "Split": split, "Slice": slice_, "Pad": pad, "Transpose": transpose,
    "Flatten": flatten, "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Reshape": reshape,
    "Resize": resize, "Upsample": resize,
}  # fmt: skip
