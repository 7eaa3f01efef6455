"""Run an ONNX graph eagerly in PyTorch, keyed by ONNX tensor names.

`OnnxTorchModule` executes the nodes of an exported ONNX CNN one by one with torch / torch.nn.functional, so that
autograd reaches every intermediate tensor: a caller can replace any named tensor by ``hook(tensor)`` (for instance
multiply a basis output by a learnable gate) and differentiate the loss through the rest of the network.  Converters
such as onnx2torch fail on dynamo exports; this interpreter only needs the ops listed in `_OPS`.

Conventions:

* Inference semantics: BatchNormalization uses its running statistics, Dropout is the identity.
* Opsets 7-21 of the default domain: the forms where attributes became inputs (Clip, Slice, Pad, Split, Squeeze,
  Unsqueeze, Reduce*, Resize, Dropout ...) are all handled; local functions are inlined first.
* dtypes: every tensor keeps its ONNX dtype, so a float16/bfloat16 model is computed in float16/bfloat16 (no upcast,
  as onnxruntime does).  Some torch CPU kernels are slow in half precision; run such models on a GPU.
* Devices: initializers and Constant node values are buffers, so ``module.to(device)`` moves them all.  Shape makes
  int64 tensors on the CPU.  When a node's inputs live on different devices they are moved to the device of its
  first floating-point input that is not on the CPU (to the CPU when there is none), so activations stay on the
  accelerator and pure shape arithmetic stays on the CPU.  Ops that need Python ints (Reshape, Slice, Pad, Expand
  ...) read them with ``.tolist()``.
* Memory: each intermediate tensor is dropped after its last consumer (computed once in ``__init__``).
* Not supported: control flow (If/Loop/Scan), non-default domains, sparse initializers, string tensors, the Indices
  output of MaxPool, training outputs of BatchNormalization, dilated AveragePool and antialiased Resize.  Unknown op
  types are reported by the constructor before any work; the rarer unsupported variants raise
  `UnsupportedModelError` when the node runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import AttributeProto, TensorProto, helper, numpy_helper

Tensor = torch.Tensor
Attrs = dict[str, Any]
Inputs = list[Tensor | None]
OpResult = Tensor | Sequence[Tensor]
OpFn = Callable[[Attrs, Inputs, int], OpResult]

_DEFAULT_DOMAINS = ("", "ai.onnx")

_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
}


class UnsupportedModelError(ValueError):
    """The model uses something this interpreter cannot run, or runs differently from onnxruntime."""


# ----------------------------------------------------------------------------------------------------- conversions


def _tensor_from_proto(proto: onnx.TensorProto) -> Tensor:
    """A CPU torch tensor holding an ONNX tensor (external data must already be loaded)."""
    if proto.data_type not in _DTYPES:
        kind = TensorProto.DataType.Name(proto.data_type)
        raise UnsupportedModelError(f"tensor {proto.name!r} has unsupported data type {kind}")
    array = numpy_helper.to_array(proto)
    if proto.data_type == TensorProto.BFLOAT16:  # numpy holds bfloat16 as ml_dtypes, which torch cannot read
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _attr_value(attr: onnx.AttributeProto) -> Any:
    if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS, AttributeProto.SPARSE_TENSOR):
        raise UnsupportedModelError(f"attribute {attr.name!r}: graph and sparse attributes are not supported")
    value = helper.get_attribute_value(attr)
    if attr.type == AttributeProto.TENSOR:
        return _tensor_from_proto(value)
    if attr.type == AttributeProto.STRING:
        return value.decode()
    if attr.type == AttributeProto.STRINGS:
        return [v.decode() for v in value]
    return value


def _node_attrs(node: onnx.NodeProto) -> Attrs:
    attrs = {attr.name: _attr_value(attr) for attr in node.attribute}
    if node.op_type == "Split":  # an even split has as many parts as outputs
        attrs.setdefault("num_outputs", len(node.output))
    return attrs


def _opt(inputs: Inputs, index: int) -> Tensor | None:
    """The optional input at index (None when absent or given as the empty name)."""
    return inputs[index] if index < len(inputs) else None


def _nonempty(tensor: Tensor | None) -> Tensor | None:
    return tensor if tensor is not None and tensor.numel() > 0 else None


def _ints(tensor: Tensor | None) -> list[int] | None:
    return None if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def _floats(tensor: Tensor | None) -> list[float] | None:
    return None if tensor is None else [float(v) for v in tensor.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _attr_or_input(attrs: Attrs, inputs: Inputs, name: str, index: int, opset: int, since: int) -> list[int] | None:
    """An int list that is the attribute `name` before opset `since` and the input at `index` from then on."""
    return _ints(_opt(inputs, index)) if opset >= since else attrs.get(name)


def _torch_pad(pads: Sequence[tuple[int, int]]) -> list[int]:
    """(begin, end) per dimension, first dimension first -> F.pad's flat list, last dimension first."""
    return [p for begin_end in reversed(pads) for p in begin_end]


# ------------------------------------------------------------------------------------------- elementwise and misc


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda attrs, inputs, opset: fn(inputs[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda attrs, inputs, opset: fn(inputs[0], inputs[1])


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda attrs, inputs, opset: reduce(fn, inputs)


def _div(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    a, b = inputs
    return a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")


def _pow(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype)


def _mean(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return reduce(torch.add, inputs) / len(inputs)


def _leaky_relu(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))


def _prelu(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x, slope = inputs
    return torch.where(x < 0, x * slope, x)


def _elu(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return F.elu(inputs[0], attrs.get("alpha", 1.0))


def _selu(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x = inputs[0]
    alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def _gelu(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


def _hard_sigmoid(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return torch.clamp(attrs.get("alpha", 0.2) * inputs[0] + attrs.get("beta", 0.5), 0.0, 1.0)


def _clip(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    if opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low, high = _opt(inputs, 1), _opt(inputs, 2)
    return inputs[0] if low is None and high is None else torch.clamp(inputs[0], low, high)


def _softmax_like(fn: Callable[..., Tensor]) -> OpFn:
    """Softmax/LogSoftmax: before opset 13 the input is coerced to 2-D at `axis` (default 1)."""

    def op(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
        x = inputs[0]
        if opset >= 13:
            return fn(x, dim=attrs.get("axis", -1))
        axis = _axis(attrs.get("axis", 1), x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
        return fn(flat, dim=1).reshape(x.shape)

    return op


def _cast(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    to = attrs["to"]
    if to not in _DTYPES:
        raise UnsupportedModelError(f"Cast to {TensorProto.DataType.Name(to)} is not supported")
    return inputs[0].to(_DTYPES[to])


def _cast_like(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return inputs[0].to(inputs[1].dtype)


def _constant(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    if "value" in attrs:
        return attrs["value"]
    for name, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                        ("value_int", torch.int64), ("value_ints", torch.int64)):
        if name in attrs:
            return torch.tensor(attrs[name], dtype=dtype)
    raise UnsupportedModelError(f"Constant with attribute {sorted(attrs)} is not supported")


def _constant_of_shape(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    value = attrs.get("value", torch.zeros(1))
    shape = _ints(inputs[0])
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype, device=inputs[0].device)


def _dropout(attrs: Attrs, inputs: Inputs, opset: int) -> tuple[Tensor, Tensor]:
    return inputs[0], torch.ones_like(inputs[0], dtype=torch.bool)


def _range(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    start, limit, delta = (t.item() for t in inputs)
    return torch.arange(start, limit, delta, dtype=inputs[0].dtype, device=inputs[0].device)


def _arg_extreme(fn: Callable[..., Tensor]) -> OpFn:
    def op(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
        x = inputs[0]
        axis, keep = _axis(attrs.get("axis", 0), x.dim()), bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)

    return op


# --------------------------------------------------------------------------------------------------- shape ops


def _shape(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    dims = list(inputs[0].shape)[attrs.get("start", 0):attrs.get("end")]
    return torch.tensor(dims, dtype=torch.int64)


def _size(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


def _reshape(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x = inputs[0]
    return x.permute(attrs.get("perm", list(reversed(range(x.dim())))))


def _squeeze(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x = inputs[0]
    axes = _attr_or_input(attrs, inputs, "axes", 1, opset, 13)
    return x.squeeze() if axes is None else x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


def _unsqueeze(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x = inputs[0]
    axes = _attr_or_input(attrs, inputs, "axes", 1, opset, 13)
    for axis in sorted(_axis(a, x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _concat(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return torch.cat(inputs, dim=attrs["axis"])


def _split(attrs: Attrs, inputs: Inputs, opset: int) -> tuple[Tensor, ...]:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 0), x.dim())
    sizes = _attr_or_input(attrs, inputs, "split", 1, opset, 13)
    if sizes is None:
        return torch.split(x, math.ceil(x.shape[axis] / attrs["num_outputs"]), dim=axis)
    return torch.split(x, sizes, dim=axis)


def _gather(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    data, index = inputs[0], inputs[1].long()
    axis = _axis(attrs.get("axis", 0), data.dim())
    index = torch.where(index < 0, index + data.shape[axis], index)
    picked = data.index_select(axis, index.reshape(-1))
    return picked.reshape(data.shape[:axis] + index.shape + data.shape[axis + 1:])


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    """ONNX Slice along one axis (clamping rules of the spec; negative steps included)."""
    dim = x.shape[axis]
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return x[(slice(None),) * axis + (slice(start, end, step),)]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return x.index_select(axis, torch.arange(start, end, step, device=x.device))


def _slice(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x = inputs[0]
    if opset < 10:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes, steps = _ints(_opt(inputs, 3)), _ints(_opt(inputs, 4))
    axes = range(len(starts)) if axes is None else axes
    for axis, start, end, step in zip(axes, starts, ends, steps or [1] * len(starts)):
        x = _slice_axis(x, _axis(axis, x.dim()), start, end, step)
    return x


def _expand(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(inputs[1]))))


def _tile(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    return inputs[0].repeat(_ints(inputs[1]))


def _pad(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x, rank = inputs[0], inputs[0].dim()
    if opset < 11:
        pads, value, axes = attrs["pads"], attrs.get("value", 0.0), None
    else:
        value_tensor = _opt(inputs, 2)
        pads, axes = _ints(inputs[1]), _ints(_opt(inputs, 3))
        value = 0 if value_tensor is None else value_tensor.item()
    axes = list(range(rank)) if axes is None else [_axis(a, rank) for a in axes]
    per_dim = [(0, 0)] * rank
    for axis, begin, end in zip(axes, pads[: len(axes)], pads[len(axes):]):
        per_dim[axis] = (begin, end)
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, _torch_pad(per_dim), value=value)
    return _pad_border(x, per_dim, mode)


def _pad_border(x: Tensor, per_dim: list[tuple[int, int]], mode: str) -> Tensor:
    """reflect/edge/wrap padding: crop negative pads, then pad the trailing <= 3 padded dims as a batch."""
    x = x[tuple(slice(max(-b, 0), x.shape[d] - max(-e, 0)) for d, (b, e) in enumerate(per_dim))]
    grow = [(max(b, 0), max(e, 0)) for b, e in per_dim]
    padded = [d for d, p in enumerate(grow) if p != (0, 0)]
    if not padded:
        return x
    lead = padded[0]
    if x.dim() - lead > 3:
        raise UnsupportedModelError(f"Pad mode {mode!r} over more than 3 trailing dimensions is not supported")
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    out = F.pad(x.reshape(-1, *x.shape[lead:]), _torch_pad(grow[lead:]), mode=torch_mode)
    return out.reshape(*x.shape[:lead], *out.shape[1:])


def _reduce(fn: Callable[..., Tensor], axes_input_since: int) -> OpFn:
    def op(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
        x = inputs[0]
        axes = _attr_or_input(attrs, inputs, "axes", 1, opset, axes_input_since)
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=tuple(_axis(a, x.dim()) for a in axes), keepdim=bool(attrs.get("keepdims", 1)))

    return op


# ------------------------------------------------------------------------------------------------- linear algebra


def _gemm(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    y = a @ b if alpha == 1.0 else alpha * (a @ b)
    if c is None:
        return y
    return y + (c if beta == 1.0 else beta * c)


def _spatial_pads(attrs: Attrs, sizes: Sequence[int], kernels: Sequence[int],
                  strides: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dim from pads/auto_pad; kernels are effective (dilated) extents."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, kernel, stride in zip(sizes, kernels, strides):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            small = total // 2
            pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return pads
    n = len(sizes)
    flat = [0] * 2 * n if auto_pad == "VALID" else attrs.get("pads", [0] * 2 * n)
    return list(zip(flat[:n], flat[n:]))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial_rank(n: int, table: Mapping[int, Callable[..., Tensor]]) -> int:
    if n not in table:
        raise UnsupportedModelError(f"{n}-D convolution/pooling is not supported")
    return n


def _conv(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = _spatial_rank(w.dim() - 2, _CONV)
    strides, dilations = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    kernels = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)]
    pads = _spatial_pads(attrs, x.shape[2:], kernels, strides)
    if all(begin == end for begin, end in pads):
        padding = [begin for begin, _ in pads]
    else:
        x, padding = F.pad(x, _torch_pad(pads)), [0] * n
    return _CONV[n](x, w, b, strides, padding, dilations, attrs.get("group", 1))


def _conv_transpose_pads(attrs: Attrs, sizes: Sequence[int], full: Sequence[int], extra: Sequence[int],
                         strides: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) output cropping of ConvTranspose from pads, output_shape or auto_pad (ONNX spec rules)."""
    n = len(sizes)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    output_shape = attrs.get("output_shape")
    if output_shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        output_shape = [size * stride for size, stride in zip(sizes, strides)]
    if output_shape is None:
        flat = [0] * 2 * n if auto_pad == "VALID" else attrs.get("pads", [0] * 2 * n)
        return list(zip(flat[:n], flat[n:]))
    pads = []
    for f, e, target in zip(full, extra, output_shape[-n:]):
        total = f + e - target
        pads.append((total // 2, total - total // 2) if auto_pad == "SAME_UPPER" else (total - total // 2, total // 2))
    return pads


def _conv_transpose(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    """Unpadded transposed convolution, then crop `pads` / append `output_padding` (zeros), then add the bias."""
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = _spatial_rank(w.dim() - 2, _CONV_TRANSPOSE)
    strides, dilations = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    extra = attrs.get("output_padding", [0] * n)
    full = [(size - 1) * s + (k - 1) * d + 1 for size, s, k, d in zip(x.shape[2:], strides, w.shape[2:], dilations)]
    pads = _conv_transpose_pads(attrs, x.shape[2:], full, extra, strides)
    y = _CONV_TRANSPOSE[n](x, w, None, strides, 0, 0, attrs.get("group", 1), dilations)
    crop = [(-begin, e - end) for (begin, end), e in zip(pads, extra)]
    if any(c != (0, 0) for c in crop):
        y = F.pad(y, _torch_pad(crop))
    return y if b is None else y + b.reshape(1, -1, *[1] * n)


@dataclass(frozen=True)
class _PoolGeometry:
    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[tuple[int, int]]  # from pads/auto_pad
    tail: list[int]  # extra end padding that ceil_mode needs once pads are applied explicitly


def _pool_geometry(attrs: Attrs, x: Tensor) -> _PoolGeometry:
    kernel = attrs["kernel_shape"]
    n = len(kernel)
    strides, dilations = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pads = _spatial_pads(attrs, x.shape[2:], extents, strides)
    tail = []
    for size, (begin, end), extent, stride in zip(x.shape[2:], pads, extents, strides):
        span = size + begin + end - extent
        if attrs.get("ceil_mode", 0):
            out = -(-span // stride) + 1
            out -= (out - 1) * stride >= size + begin  # no window may start in the end padding
        else:
            out = span // stride + 1
        tail.append(max((out - 1) * stride + extent - size - begin - end, 0))
    return _PoolGeometry(kernel, strides, dilations, pads, tail)


def _max_pool(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x = inputs[0]
    g = _pool_geometry(attrs, x)
    n = _spatial_rank(len(g.kernel), _MAX_POOL)
    extents = [(k - 1) * d + 1 for k, d in zip(g.kernel, g.dilations)]
    if all(begin == end and 2 * begin <= e for (begin, end), e in zip(g.pads, extents)):  # torch pads itself
        padding, ceil_mode = [begin for begin, _ in g.pads], bool(attrs.get("ceil_mode", 0))
    else:
        pads = [(begin, end + t) for (begin, end), t in zip(g.pads, g.tail)]
        x, padding, ceil_mode = F.pad(x, _torch_pad(pads), value=float("-inf")), [0] * n, False
    return _MAX_POOL[n](x, g.kernel, g.strides, padding, g.dilations, ceil_mode=ceil_mode)


def _avg_pool(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    """Window sums over explicitly padded input, divided by the count of cells that ONNX counts."""
    x = inputs[0]
    g = _pool_geometry(attrs, x)
    n = _spatial_rank(len(g.kernel), _AVG_POOL)
    if any(d != 1 for d in g.dilations):
        raise UnsupportedModelError("AveragePool with dilations is not supported")
    pool = _AVG_POOL[n]
    pads = [(begin, end + t) for (begin, end), t in zip(g.pads, g.tail)]
    if all(p == (0, 0) for p in pads):
        return pool(x, g.kernel, g.strides)
    mean = pool(F.pad(x, _torch_pad(pads)), g.kernel, g.strides)
    cells = F.pad(torch.ones(x.shape[2:], dtype=x.dtype, device=x.device), _torch_pad(g.pads),
                  value=float(attrs.get("count_include_pad", 0)))
    cells = F.pad(cells, _torch_pad([(0, t) for t in g.tail]))
    return mean / pool(cells[None, None], g.kernel, g.strides)


def _global_pool(fn: Callable[..., Tensor]) -> OpFn:
    return lambda attrs, inputs, opset: fn(inputs[0], dim=tuple(range(2, inputs[0].dim())), keepdim=True)


# ----------------------------------------------------------------------------------------------- normalization


def _batch_norm(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.get("epsilon", 1e-5)
    if opset < 9 and attrs.get("spatial", 1) == 0:  # per-activation statistics of shape (C, D1, ...)
        shape = (1, *scale.shape)
        scale, bias, mean, var = (t.reshape(shape) for t in (scale, bias, mean, var))
        return (x - mean) / torch.sqrt(var + eps) * scale + bias
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)


def _instance_norm(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    x, scale, bias = inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


def _layer_norm(attrs: Attrs, inputs: Inputs, opset: int) -> tuple[Tensor, Tensor, Tensor]:
    x, scale, bias = inputs[0], inputs[1], _opt(inputs, 2)
    dims = tuple(range(_axis(attrs.get("axis", -1), x.dim()), x.dim()))
    stashed = x.to(_DTYPES[attrs.get("stash_type", TensorProto.FLOAT)])
    mean = stashed.mean(dims, keepdim=True)
    centered = stashed - mean
    inv_std = torch.rsqrt(centered.square().mean(dims, keepdim=True) + attrs.get("epsilon", 1e-5))
    y = (centered * inv_std).to(x.dtype) * scale
    return (y if bias is None else y + bias), mean, inv_std


def _lrn(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    """Cross-channel LRN; the window is [c - floor((size-1)/2), c + ceil((size-1)/2)] as in ONNX."""
    x = inputs[0]
    size = attrs["size"]
    squares = x.square().reshape(x.shape[0], 1, x.shape[1], -1)
    squares = F.pad(squares, (0, 0, (size - 1) // 2, size // 2))
    mean = F.avg_pool2d(squares, (size, 1), stride=1).reshape(x.shape)
    return x / (attrs.get("bias", 1.0) + attrs.get("alpha", 1e-4) * mean) ** attrs.get("beta", 0.75)


# ---------------------------------------------------------------------------------------------------------- Resize

_ROUNDING: dict[str, Callable[[Tensor, float], Tensor]] = {
    "round_prefer_floor": lambda c, scale: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c, scale: torch.floor(c + 0.5),
    "floor": lambda c, scale: torch.floor(c),
    "ceil": lambda c, scale: torch.ceil(c),
    "simple": lambda c, scale: torch.ceil(c) if scale < 1 else torch.floor(c),  # Resize-10 / Upsample
}


def _resize_targets(attrs: Attrs, sizes_in: list[int], scales: Tensor | None,
                    sizes: Tensor | None) -> tuple[list[float], list[int]]:
    """Scale factors (as used by the coordinate transforms) and output sizes of the resized axes."""
    if sizes is not None:
        target = _ints(sizes)
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            return [t / s for t, s in zip(target, sizes_in)], target
        ratio = (min if policy == "not_larger" else max)(t / s for t, s in zip(target, sizes_in))
        return [ratio] * len(sizes_in), [math.floor(ratio * s + 0.5) for s in sizes_in]
    if scales is None:
        raise UnsupportedModelError("Resize needs scales or sizes")
    factors = scales.float().reshape(-1).cpu()
    target = torch.floor(factors * torch.tensor(sizes_in, dtype=torch.float32)).long()
    return factors.tolist(), target.tolist()


def _source_coords(transform: str, size_in: int, size_out: int, scale: float, roi: tuple[float, float]) -> Tensor:
    """Input coordinate of every output index along one axis (float32, like onnxruntime)."""
    y = torch.arange(size_out, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    if transform == "half_pixel":
        return (y + 0.5) / s - 0.5
    if transform == "pytorch_half_pixel":
        return (y + 0.5) / s - 0.5 if size_out > 1 else torch.zeros_like(y)
    if transform == "half_pixel_symmetric":
        offset = size_in / 2 * (1 - size_out / (scale * size_in))
        return offset + (y + 0.5) / s - 0.5
    if transform == "align_corners":
        return y * (size_in - 1) / (size_out - 1) if size_out > 1 else torch.zeros_like(y)
    if transform == "asymmetric":
        return y / s
    if transform == "tf_half_pixel_for_nn":
        return (y + 0.5) / s
    if transform == "tf_crop_and_resize":
        start, end = roi
        if size_out > 1:
            return start * (size_in - 1) + y * (end - start) * (size_in - 1) / (size_out - 1)
        return torch.full_like(y, 0.5 * (start + end) * (size_in - 1))
    raise UnsupportedModelError(f"Resize coordinate_transformation_mode {transform!r} is not supported")


Taps = list[tuple[Tensor, Tensor | None]]  # (input index, weight) per output index, summed over taps


def _nearest_taps(coords: Tensor, size: int, attrs: Attrs, opset: int, scale: float) -> Taps:
    rounding = attrs.get("nearest_mode", "round_prefer_floor" if opset >= 11 else "simple")
    return [(_ROUNDING[rounding](coords, scale).long().clamp(0, size - 1), None)]


def _linear_taps(coords: Tensor, size: int, attrs: Attrs, opset: int, scale: float) -> Taps:
    coords = coords.clamp(0, size - 1)
    low = coords.floor()
    frac = coords - low
    return [(low.long(), 1 - frac), ((low.long() + 1).clamp(max=size - 1), frac)]


def _cubic_taps(coords: Tensor, size: int, attrs: Attrs, opset: int, scale: float) -> Taps:
    a = attrs.get("cubic_coeff_a", -0.75)
    base = coords.floor()
    frac = coords - base
    taps = []
    for k in (-1, 0, 1, 2):
        index = base.long() + k
        d = (frac - k).abs()
        weight = torch.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                             torch.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
        if attrs.get("exclude_outside", 0):
            weight = weight * ((index >= 0) & (index < size))
        taps.append((index.clamp(0, size - 1), weight))
    if attrs.get("exclude_outside", 0):
        total = sum(weight for _, weight in taps)
        taps = [(index, weight / total) for index, weight in taps]
    return taps


_TAPS = {"nearest": _nearest_taps, "linear": _linear_taps, "cubic": _cubic_taps}


def _resample(x: Tensor, axis: int, coords: Tensor, attrs: Attrs, opset: int, scale: float) -> Tensor:
    size = x.shape[axis]
    shape = [1] * x.dim()
    shape[axis] = -1
    out = None
    for index, weight in _TAPS[attrs.get("mode", "nearest")](coords, size, attrs, opset, scale):
        part = x.index_select(axis, index.to(x.device))
        if weight is not None:
            part = part * weight.to(x.device, x.dtype).reshape(shape)
        out = part if out is None else out + part
    if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        outside = ((coords < 0) | (coords > size - 1)).to(x.device).reshape(shape)
        out = out.masked_fill(outside, attrs.get("extrapolation_value", 0.0))
    return out


def _resize(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    """Separable resampling axis by axis: nearest, linear (bi-/trilinear ...) and cubic."""
    x = inputs[0]
    if opset < 11:
        roi, scales, sizes = None, inputs[1], None
    else:
        roi, scales, sizes = _opt(inputs, 1), _opt(inputs, 2), _opt(inputs, 3)
    axes = [_axis(a, x.dim()) for a in attrs.get("axes", range(x.dim()))]
    factors, targets = _resize_targets(attrs, [x.shape[a] for a in axes], _nonempty(scales), _nonempty(sizes))
    mode = attrs.get("mode", "nearest")
    if mode not in _TAPS:
        raise UnsupportedModelError(f"Resize mode {mode!r} is not supported")
    if attrs.get("antialias", 0) and mode != "nearest" and min(factors) < 1:
        raise UnsupportedModelError("Resize with antialias is not supported")
    transform = attrs.get("coordinate_transformation_mode", "half_pixel" if opset >= 11 else "asymmetric")
    rois = _floats(_nonempty(roi)) or [0.0] * len(axes) + [1.0] * len(axes)
    for i, (axis, factor, target) in enumerate(zip(axes, factors, targets)):
        size = x.shape[axis]
        if target == size and factor == 1 and transform != "tf_crop_and_resize":
            continue  # as in onnxruntime, even where a transform would shift (tf_half_pixel_for_nn)
        coords = _source_coords(transform, size, target, factor, (rois[i], rois[i + len(axes)]))
        x = _resample(x, axis, coords, attrs, opset, factor)
    return x


def _upsample(attrs: Attrs, inputs: Inputs, opset: int) -> Tensor:
    scales = torch.tensor(attrs["scales"]) if opset < 9 else inputs[1]
    return _resize({"mode": attrs.get("mode", "nearest")}, [inputs[0], scales], 10)


# ------------------------------------------------------------------------------------------------ dispatch table

_OPS: dict[str, OpFn] = {
    "Abs": _unary(torch.abs),
    "Add": _binary(torch.add),
    "And": _binary(torch.logical_and),
    "ArgMax": _arg_extreme(torch.argmax),
    "ArgMin": _arg_extreme(torch.argmin),
    "AveragePool": _avg_pool,
    "BatchNormalization": _batch_norm,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Ceil": _unary(torch.ceil),
    "Clip": _clip,
    "Concat": _concat,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Div": _div,
    "Dropout": _dropout,
    "Elu": _elu,
    "Equal": _binary(torch.eq),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Expand": _expand,
    "Flatten": _flatten,
    "Floor": _unary(torch.floor),
    "Gather": _gather,
    "Gelu": _gelu,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_pool(torch.mean),
    "GlobalMaxPool": _global_pool(torch.amax),
    "Greater": _binary(torch.gt),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Identity": _unary(lambda x: x),
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "LeakyRelu": _leaky_relu,
    "Less": _binary(torch.lt),
    "Log": _unary(torch.log),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "LRN": _lrn,
    "MatMul": _binary(torch.matmul),
    "Max": _variadic(torch.maximum),
    "MaxPool": _max_pool,
    "Mean": _mean,
    "Min": _variadic(torch.minimum),
    "Mish": _unary(F.mish),
    "Mul": _binary(torch.mul),
    "Neg": _unary(torch.neg),
    "Not": _unary(torch.logical_not),
    "Or": _binary(torch.logical_or),
    "Pad": _pad,
    "Pow": _pow,
    "PRelu": _prelu,
    "Range": _range,
    "Reciprocal": _unary(torch.reciprocal),
    "ReduceMax": _reduce(torch.amax, 18),
    "ReduceMean": _reduce(torch.mean, 18),
    "ReduceMin": _reduce(torch.amin, 18),
    "ReduceSum": _reduce(torch.sum, 13),
    "Relu": _unary(torch.relu),
    "Reshape": _reshape,
    "Resize": _resize,
    "Selu": _selu,
    "Shape": _shape,
    "Sigmoid": _unary(torch.sigmoid),
    "Size": _size,
    "Slice": _slice,
    "Softmax": _softmax_like(torch.softmax),
    "Softplus": _unary(F.softplus),
    "Split": _split,
    "Sqrt": _unary(torch.sqrt),
    "Squeeze": _squeeze,
    "Sub": _binary(torch.sub),
    "Sum": _variadic(torch.add),
    "Tanh": _unary(torch.tanh),
    "Tile": _tile,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Upsample": _upsample,
    "Where": lambda attrs, inputs, opset: torch.where(inputs[0], inputs[1], inputs[2]),
}


# ------------------------------------------------------------------------------------------------------ the module


def _inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.inliner.inline_local_functions(model) if model.functions else model


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Sorted op types (domain-qualified if not the default domain) the interpreter cannot run."""
    labels = {_op_label(node) for node in _inlined(model).graph.node}
    return sorted(label for label in labels if label not in _OPS)


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS:
            return opset.version
    raise UnsupportedModelError("the model imports no default-domain opset")


def _same_device(tensors: Inputs) -> Inputs:
    """Move the inputs of one node to one device: that of the first float input off the CPU, else the CPU."""
    present = [t for t in tensors if t is not None]
    if len({t.device for t in present}) < 2:
        return tensors
    cpu = torch.device("cpu")
    target = next((t.device for t in present if t.is_floating_point() and t.device != cpu), cpu)
    return [None if t is None else t.to(target) for t in tensors]


@dataclass(frozen=True)
class _Step:
    """One node to run, and the tensors nobody needs after it."""

    fn: OpFn
    node: str
    label: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Attrs
    release: tuple[str, ...]


def _plan(nodes: list[tuple[onnx.NodeProto, Attrs]], keep: set[str]) -> list[_Step]:
    """Steps in graph order; each tensor (except `keep`) is released after its last consumer."""
    last_use: dict[str, int] = {}
    for i, (node, _) in enumerate(nodes):
        for name in node.output:
            last_use.setdefault(name, i)  # a tensor nobody consumes dies with its producer
        for name in node.input:
            last_use[name] = i
    release: dict[int, list[str]] = {}
    for name, i in last_use.items():
        if name and name not in keep:
            release.setdefault(i, []).append(name)
    return [
        _Step(_OPS[node.op_type], node.name, f"{node.op_type} node {node.name!r}", tuple(node.input), tuple(node.output),
              attrs, tuple(release.get(i, ())))
        for i, (node, attrs) in enumerate(nodes)
    ]


class OnnxTorchModule(torch.nn.Module):
    """An ONNX graph as a torch module; see the module docstring for the semantics."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        model = _inlined(model)
        missing = unsupported_ops(model)
        if missing:
            raise UnsupportedModelError(f"unsupported ONNX ops: {', '.join(missing)}")
        graph = model.graph
        if graph.sparse_initializer:
            raise UnsupportedModelError("sparse initializers are not supported")
        self.opset = _default_opset(model)
        self._constants: dict[str, str] = {}  # ONNX name -> buffer name
        for initializer in graph.initializer:
            self._add_constant(initializer.name, _tensor_from_proto(initializer))
        nodes = []
        for node in graph.node:
            attrs = _node_attrs(node)
            if node.op_type == "Constant":
                self._add_constant(node.output[0], _constant(attrs, [], self.opset))
            else:
                nodes.append((node, attrs))
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in self._constants]
        self.output_names: list[str] = [o.name for o in graph.output]
        self._steps = _plan(nodes, set(self.output_names))
        produced = {name for node, _ in nodes for name in node.output if name}
        self._names = produced | set(self._constants) | set(self.input_names)

    def _add_constant(self, name: str, value: Tensor) -> None:
        buffer = f"onnx_constant_{len(self._constants)}"
        self.register_buffer(buffer, value)
        self._constants[name] = buffer

    def _feed(self, args: Sequence[Tensor], named: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if len(args) > len(self.input_names):
            raise TypeError(f"expected at most {len(self.input_names)} inputs, got {len(args)}")
        values = dict(zip(self.input_names, args))
        for name, value in named.items():
            if name not in self.input_names or name in values:
                raise TypeError(f"unexpected or duplicate input {name!r}; inputs are {self.input_names}")
            values[name] = value
        missing = [name for name in self.input_names if name not in values]
        if missing:
            raise TypeError(f"missing inputs {missing}")
        return values

    def forward(self, *args: Tensor, hooks: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                **named: Tensor) -> tuple[Tensor, ...]:
        """Graph outputs for inputs given in `input_names` order or by name.

        hooks: ONNX tensor name -> function; the tensor is replaced by hook(tensor) as soon as it exists.
        """
        hooks = hooks or {}
        unknown = sorted(set(hooks) - self._names)
        if unknown:
            raise KeyError(f"hooks name tensors that are not in the graph: {unknown}")
        env = self.initial_env(*args, **named)
        for name, hook in hooks.items():
            if name in env:
                env[name] = hook(env[name])
        for step in self._steps:
            self.run_step(step, env, hooks)
        return tuple(env[name] for name in self.output_names)

    @property
    def steps(self) -> tuple[_Step, ...]:
        """The nodes in execution order (Constant nodes excluded: they are buffers)."""
        return tuple(self._steps)

    def initial_env(self, *args: Tensor, **named: Tensor) -> dict[str, Tensor]:
        """Constants and graph inputs by ONNX name: where :meth:`run_step` starts."""
        env = {name: self._buffers[buffer] for name, buffer in self._constants.items()}
        env.update(self._feed(args, named))
        return env

    def run_step(self, step: _Step, env: dict[str, Tensor], hooks: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                 replace: Mapping[int, Tensor] | None = None) -> None:
        """Run one node on ``env`` (name -> tensor) in place: its outputs are added (through
        ``hooks``), the tensors it was the last consumer of are dropped. ``replace`` substitutes
        input tensors by position (a refitted weight or bias, which may be a new input)."""
        inputs = [env[name] if name else None for name in step.inputs]
        if replace:
            inputs += [None] * (max(replace) + 1 - len(inputs))
            for index, tensor in replace.items():
                inputs[index] = tensor
        inputs = _same_device(inputs)
        try:
            result = step.fn(step.attrs, inputs, self.opset)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"{step.label}: {error}") from None
        results = (result,) if isinstance(result, Tensor) else tuple(result)
        for index, name in enumerate(step.outputs):
            if not name:
                continue
            if index >= len(results):
                raise UnsupportedModelError(f"{step.label}: output #{index} ({name!r}) is not supported")
            env[name] = hooks[name](results[index]) if hooks and name in hooks else results[index]
        for name in step.release:
            env.pop(name, None)


# ------------------------------------------------------------------------------------------------- verification


def _relative_difference(actual: Tensor, expected: np.ndarray, name: str) -> float:
    a = actual.detach().cpu().double().numpy()
    b = np.asarray(expected).astype(np.float64)
    if a.shape != b.shape:
        raise UnsupportedModelError(f"output {name!r}: Torch shape {a.shape} differs from onnxruntime's {b.shape}")
    if b.size == 0:
        return 0.0
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    error = float(np.where(same, 0.0, np.abs(a - b)).max())
    finite = np.abs(b[np.isfinite(b)])
    scale = float(finite.max()) if finite.size else 0.0
    return error / scale if scale > 0 else error


def check_against_onnxruntime(module: OnnxTorchModule, model: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                              rtol: float = 1e-4) -> float:
    """Run both on the same inputs; return the max relative difference (max|a-b| / max|b|, over all outputs);
    raise UnsupportedModelError("...: Torch execution differs from onnxruntime by X (limit 1e-4)") above rtol."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(module.output_names, dict(inputs))
    device = next((buffer.device for buffer in module.buffers()), torch.device("cpu"))
    feed = {name: torch.from_numpy(np.array(inputs[name])).to(device) for name in module.input_names}
    with torch.no_grad():
        actual = module(**feed)
    differences = [_relative_difference(a, b, name) for a, b, name in zip(actual, expected, module.output_names)]
    difference = max(differences, default=0.0)
    if not difference <= rtol:
        label = model.graph.name or "model"
        raise UnsupportedModelError(f"{label}: Torch execution differs from onnxruntime by {difference:.3g} "
                                    f"(limit {rtol:g})")
    return difference
