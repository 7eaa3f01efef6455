"""Tests of onnx_basisprune.calibration.interpreter against onnxruntime: single ops across opsets, exported models."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_basisprune.calibration.interpreter import (
    OnnxTorchModule,
    UnsupportedModelError,
    _same_device,
    check_against_onnxruntime,
    unsupported_ops,
)

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
RNG = np.random.default_rng(1234)
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Const:
    """An input given as an initializer instead of a graph input."""

    value: np.ndarray


def rand(*shape: int, positive: bool = False) -> np.ndarray:
    values = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(values) + 0.1 if positive else values


def ints(*values: int) -> Const:
    return Const(np.array(values, dtype=np.int64))


def floats(*values: float) -> Const:
    return Const(np.array(values, dtype=np.float32))


def scalar(value: float | int, dtype: type = np.float32) -> Const:
    return Const(np.array(value, dtype=dtype))


def build_model(op: str, opset: int, inputs: list, attrs: dict, n_outputs: int = 1,
                domain: str = "") -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One node; arrays become graph inputs, Const initializers, None the empty (omitted) input name."""
    names, graph_inputs, initializers, feeds = [], [], [], {}
    for i, value in enumerate(inputs):
        if value is None:
            names.append("")
        elif isinstance(value, Const):
            names.append(f"c{i}")
            initializers.append(numpy_helper.from_array(value.value, f"c{i}"))
        else:
            names.append(f"x{i}")
            feeds[f"x{i}"] = value
            elem_type = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(f"x{i}", elem_type, value.shape))
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    graph = helper.make_graph([node], op, graph_inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outputs],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10), feeds


def assert_matches_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float) -> None:
    module = OnnxTorchModule(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    with torch.no_grad():
        actual = module(**{name: torch.from_numpy(value) for name, value in feeds.items()})
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (tuple(a.shape), a.dtype) == (e.shape, torch.from_numpy(np.asarray(e)).dtype)
    assert check_against_onnxruntime(module, model, feeds, rtol=rtol) <= rtol


CASES: list = []


def case(op: str, opset: int, inputs: list, label: str = "", n_outputs: int = 1, **attrs: object) -> None:
    CASES.append(pytest.param(op, opset, inputs, attrs, n_outputs, id=f"{op}-{opset}-{label}".rstrip("-")))


# elementwise, activations, logic
X = rand(2, 3, 4, 5)
for name in ("Add", "Sub", "Mul", "Div"):
    case(name, 13, [X, rand(3, 1, 5)], "broadcast")
    case(name, 7, [X, Const(rand(5))], "const")
case("Div", 13, [np.array([7, -7, 9, -9], np.int64), np.array([2, 2, -4, -4], np.int64)], "int")
case("Pow", 7, [rand(2, 3, positive=True), rand(2, 3)])
case("Pow", 15, [rand(2, 3), ints(2)], "int-exponent")
for name in ("Max", "Min", "Sum", "Mean"):
    case(name, 13, [rand(2, 3, 4), rand(3, 1), rand(4)], "three")
    case(name, 8, [rand(2, 3)], "one")
for name in ("Relu", "Sigmoid", "Tanh", "Neg", "Exp", "Erf", "Identity", "Abs", "Ceil", "Floor", "Softplus", "Elu",
             "Selu"):
    case(name, 13, [rand(2, 3, 4)])
for name in ("Log", "Sqrt", "Reciprocal"):
    case(name, 13, [rand(2, 3, 4, positive=True)])
case("HardSwish", 14, [rand(2, 3, 4) * 4])
case("Mish", 18, [rand(2, 3, 4)])
case("Gelu", 20, [rand(2, 3, 4)])
case("Gelu", 20, [rand(2, 3, 4)], "tanh", approximate="tanh")
case("LeakyRelu", 7, [rand(2, 3, 4)])
case("LeakyRelu", 16, [rand(2, 3, 4)], "alpha", alpha=0.3)
case("HardSigmoid", 7, [rand(2, 3, 4) * 4])
case("HardSigmoid", 13, [rand(2, 3, 4) * 4], "alpha-beta", alpha=0.25, beta=0.4)
case("PRelu", 16, [rand(2, 3, 4, 4), Const(rand(3, 1, 1))])
case("Equal", 13, [np.array([1, 2, 3], np.int64), np.array([1, 0, 3], np.int64)])
case("Less", 13, [rand(3, 4), rand(4)])
case("Greater", 13, [rand(3, 4), rand(4)])
case("Not", 13, [np.array([True, False])])
case("And", 13, [np.array([True, False, True]), np.array([True, True, False])])
case("Or", 13, [np.array([True, False, False]), np.array([False, False, True])])
case("Where", 16, [rand(3, 4) > 0, rand(3, 4), rand(4)])
case("ArgMax", 13, [rand(3, 4, 5)], axis=1)
case("ArgMax", 13, [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], "last", axis=1, keepdims=0, select_last_index=1)
case("ArgMin", 13, [rand(3, 4, 5)], axis=-1, keepdims=0)
case("Cast", 13, [rand(3, 4) * 5], "int64", to=TensorProto.INT64)
case("Cast", 13, [rand(3, 4)], "float16", to=TensorProto.FLOAT16)
case("Cast", 13, [np.array([0, 2, -3], np.int64)], "bool", to=TensorProto.BOOL)
case("Cast", 7, [np.array([0, 2, -3], np.int32)], "float", to=TensorProto.FLOAT)
case("CastLike", 15, [np.array([1, 2], np.int64), Const(np.zeros(1, np.float32))])
case("Clip", 7, [rand(3, 4)], "attrs", min=-0.5, max=0.5)
case("Clip", 7, [rand(3, 4)], "min-attr", min=0.0)
case("Clip", 11, [rand(3, 4), scalar(-0.5), scalar(0.5)], "inputs")
case("Clip", 11, [rand(3, 4), None, scalar(0.5)], "max-only")
case("Clip", 13, [rand(3, 4)], "none")
case("Dropout", 7, [rand(3, 4)], "ratio-attr", ratio=0.3)
case("Dropout", 12, [rand(3, 4), scalar(0.3)], "ratio-input")
case("Dropout", 13, [rand(3, 4), scalar(0.3), Const(np.array(False))], "mask", n_outputs=2)

# constants and shapes
case("Constant", 13, [], "tensor", value=numpy_helper.from_array(rand(2, 3)))
case("Constant", 13, [], "floats", value_floats=[1.0, 2.5])
case("Constant", 13, [], "ints", value_ints=[3, 4])
case("Constant", 13, [], "int", value_int=7)
case("ConstantOfShape", 9, [ints(2, 3)])
case("ConstantOfShape", 20, [ints(2, 3)], "int", value=numpy_helper.from_array(np.array([5], np.int64)))
case("Shape", 13, [rand(2, 3, 4)])
case("Shape", 15, [rand(2, 3, 4, 5)], "start-end", start=1, end=-1)
case("Shape", 15, [rand(2, 3, 4, 5)], "start", start=-2)
case("Size", 13, [rand(2, 3, 4)])
case("Reshape", 13, [rand(2, 3, 4), ints(0, -1)], "zero")
case("Reshape", 14, [rand(2, 3, 4), ints(4, -1, 2)], "allowzero", allowzero=1)
case("Flatten", 9, [rand(2, 3, 4, 5)])
case("Flatten", 13, [rand(2, 3, 4, 5)], "axis0", axis=0)
case("Flatten", 13, [rand(2, 3, 4, 5)], "negative", axis=-1)
case("Transpose", 13, [rand(2, 3, 4)], "perm", perm=[1, 2, 0])
case("Transpose", 13, [rand(2, 3, 4)], "default")
case("Squeeze", 11, [rand(2, 1, 4, 1)], "attr", axes=[1, -1])
case("Squeeze", 13, [rand(2, 1, 4, 1), ints(-1)], "input")
case("Squeeze", 13, [rand(2, 1, 4, 1)], "all")
case("Unsqueeze", 11, [rand(2, 3)], "attr", axes=[0, 3])
case("Unsqueeze", 13, [rand(2, 3), ints(-1, 1)], "input")
case("Unsqueeze", 13, [np.array(5, np.int64), ints(0)], "scalar")
case("Concat", 13, [rand(2, 3), rand(2, 1), rand(2, 4)], axis=-1)
case("Concat", 13, [np.array([1, 2], np.int64), ints(-1)], "shape", axis=0)
case("Split", 11, [rand(6, 4)], "attr", n_outputs=2, axis=0, split=[2, 4])
case("Split", 11, [rand(6, 4)], "even", n_outputs=3)
case("Split", 13, [rand(3, 6), ints(1, 5)], "input", n_outputs=2, axis=1)
case("Split", 18, [rand(3, 7)], "num-outputs", n_outputs=3, axis=-1, num_outputs=3)
case("Gather", 13, [np.array([2, 3, 5, 7], np.int64), scalar(2, np.int64)], "scalar")
case("Gather", 13, [rand(3, 4, 5), Const(np.array([[0, -1], [2, 1]], np.int64))], "axis1", axis=1)
case("Gather", 11, [rand(5, 3), Const(np.array([4, 0], np.int32))], "int32")
case("Slice", 7, [rand(5, 6)], "attrs", starts=[1, 0], ends=[4, -1])
case("Slice", 9, [rand(5, 6)], "axes", starts=[1], ends=[100], axes=[1])
case("Slice", 10, [rand(5, 6), ints(1), ints(4), ints(1), ints(2)], "steps")
case("Slice", 13, [rand(5, 6), ints(-1, 4), ints(-INT64_MAX, 0), ints(0, -1), ints(-2, -1)], "negative-steps")
case("Slice", 13, [rand(5, 6), ints(-3), ints(INT64_MAX), ints(-2)], "to-end")
case("Slice", 13, [rand(5, 6), ints(-10), ints(-20), ints(0), ints(-1)], "empty")
case("Expand", 13, [rand(3, 1), ints(2, 1, 4)])
case("Expand", 13, [rand(1, 3, 1), ints(3, 1)], "ones")
case("Tile", 13, [rand(2, 3), ints(2, 3)])
case("Range", 11, [scalar(1, np.int64), scalar(10, np.int64), scalar(3, np.int64)])
case("Range", 11, [scalar(0.5), scalar(-2.0), scalar(-0.75)], "float")

# linear algebra, convolutions
case("MatMul", 13, [rand(3, 4), rand(4, 5)])
case("MatMul", 13, [rand(2, 3, 4), Const(rand(4, 5))], "batched")
case("MatMul", 13, [rand(4), rand(2, 4, 3)], "vector")
case("Gemm", 13, [rand(3, 4), Const(rand(5, 4)), Const(rand(5))], "transB", transB=1)
case("Gemm", 7, [rand(4, 3), rand(4, 5), rand(3, 5)], "transA-alpha-beta", transA=1, alpha=0.5, beta=2.0)
case("Gemm", 11, [rand(3, 4), rand(4, 5)], "no-C")
case("Gemm", 13, [rand(3, 4), rand(5, 4), scalar(0.3)], "scalar-C", transB=1)
W = Const(rand(4, 3, 3, 3))
B = Const(rand(4))
case("Conv", 11, [rand(1, 3, 7, 8), W], "plain")
case("Conv", 11, [rand(2, 3, 7, 8), W, B], "bias-pads-strides", pads=[1, 1, 1, 1], strides=[2, 2])
case("Conv", 11, [rand(1, 3, 9, 9), W, B], "dilations", dilations=[2, 1], pads=[2, 1, 2, 1])
case("Conv", 11, [rand(1, 3, 7, 8), W, B], "asymmetric", pads=[0, 1, 2, 0])
case("Conv", 11, [rand(1, 3, 7, 8), W], "same-upper", auto_pad="SAME_UPPER", strides=[2, 2])
case("Conv", 11, [rand(1, 3, 7, 8), W], "same-lower", auto_pad="SAME_LOWER", strides=[2, 3])
case("Conv", 11, [rand(1, 3, 7, 8), W], "valid", auto_pad="VALID", strides=[2, 2])
case("Conv", 11, [rand(1, 4, 6, 6), Const(rand(4, 1, 3, 3)), B], "depthwise", group=4, pads=[1, 1, 1, 1])
case("Conv", 11, [rand(1, 4, 6, 6), Const(rand(6, 2, 1, 1))], "groups", group=2)
case("Conv", 1, [rand(1, 3, 7, 8), W], "opset1")
case("Conv", 11, [rand(2, 3, 10), Const(rand(4, 3, 3)), B], "1d", pads=[1, 2], strides=[2])
case("Conv", 11, [rand(1, 2, 5, 6, 7), Const(rand(3, 2, 3, 3, 3)), Const(rand(3))], "3d", pads=[1, 0, 1, 1, 0, 1])
WT = Const(rand(3, 2, 3, 3))
case("ConvTranspose", 11, [rand(1, 3, 4, 5), WT], "plain")
case("ConvTranspose", 11, [rand(1, 3, 4, 5), WT, Const(rand(2))], "strides-pads", strides=[2, 2], pads=[1, 1, 1, 1])
case("ConvTranspose", 11, [rand(1, 3, 4, 5), WT, Const(rand(2))], "output-padding", strides=[2, 3],
     output_padding=[1, 2], pads=[1, 0, 0, 1])
case("ConvTranspose", 11, [rand(1, 3, 4, 5), WT], "dilations", dilations=[2, 2], strides=[2, 1])
case("ConvTranspose", 11, [rand(1, 4, 4, 5), Const(rand(4, 1, 3, 3)), Const(rand(2))], "groups", group=2,
     strides=[2, 2])
case("ConvTranspose", 11, [rand(1, 3, 4, 5), WT], "output-shape", strides=[2, 2], output_shape=[8, 10])
case("ConvTranspose", 11, [rand(1, 3, 4, 5), WT], "same-upper", strides=[2, 2], auto_pad="SAME_UPPER")
case("ConvTranspose", 11, [rand(1, 3, 4, 5), WT], "same-lower", strides=[2, 2], auto_pad="SAME_LOWER")
case("ConvTranspose", 11, [rand(1, 3, 6), Const(rand(3, 2, 4)), Const(rand(2))], "1d", strides=[2], pads=[1, 1])

# pooling and normalization
P = rand(2, 3, 9, 10)
for opset in (7, 10, 12):
    case("MaxPool", opset, [P], "k3s2p1", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
case("MaxPool", 12, [P], "ceil", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
case("MaxPool", 12, [rand(1, 2, 5, 5)], "ceil-drop", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
     ceil_mode=1)
case("MaxPool", 12, [P], "dilations", kernel_shape=[2, 3], dilations=[2, 2], pads=[1, 1, 1, 1])
case("MaxPool", 12, [P], "asymmetric", kernel_shape=[3, 3], pads=[0, 2, 1, 0], strides=[2, 1])
case("MaxPool", 12, [P], "asymmetric-ceil", kernel_shape=[3, 3], pads=[0, 2, 1, 0], strides=[2, 2], ceil_mode=1)
case("MaxPool", 12, [P], "same-upper", kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")
case("MaxPool", 12, [P], "same-lower", kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER")
case("MaxPool", 12, [rand(2, 3, 11)], "1d", kernel_shape=[3], strides=[2], pads=[1, 1])
case("MaxPool", 12, [rand(1, 2, 5, 6, 7)], "3d", kernel_shape=[2, 3, 2], strides=[2, 2, 2])
for opset in (7, 10, 19):
    case("AveragePool", opset, [P], "k3s2", kernel_shape=[3, 3], strides=[2, 2])
case("AveragePool", 11, [P], "pads-exclude", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
case("AveragePool", 11, [P], "pads-include", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
     count_include_pad=1)
case("AveragePool", 11, [P], "ceil", kernel_shape=[2, 4], strides=[2, 3], ceil_mode=1)
case("AveragePool", 11, [P], "ceil-pads-include", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
     ceil_mode=1, count_include_pad=1)
case("AveragePool", 11, [P], "asymmetric", kernel_shape=[3, 3], pads=[0, 2, 1, 0], count_include_pad=1)
case("AveragePool", 11, [P], "same-upper", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
case("AveragePool", 11, [P], "same-lower", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")
case("AveragePool", 11, [rand(2, 3, 11)], "1d", kernel_shape=[3], strides=[2], pads=[1, 1])
case("AveragePool", 11, [rand(1, 2, 5, 6, 7)], "3d", kernel_shape=[2, 3, 2], strides=[1, 2, 2])
case("GlobalAveragePool", 13, [P])
case("GlobalMaxPool", 13, [P])
case("GlobalAveragePool", 13, [rand(2, 3, 4, 5, 6)], "3d")
BN = [Const(rand(3)), Const(rand(3)), Const(rand(3)), Const(rand(3, positive=True))]
for opset in (7, 9, 14, 15):
    case("BatchNormalization", opset, [P, *BN], epsilon=1e-3)
case("BatchNormalization", 7, [rand(2, 3, 4), Const(rand(3, 4)), Const(rand(3, 4)), Const(rand(3, 4)),
                               Const(rand(3, 4, positive=True))], "per-activation", spatial=0)
case("BatchNormalization", 14, [rand(4, 3), *BN], "2d", training_mode=0)
case("InstanceNormalization", 6, [P, Const(rand(3)), Const(rand(3))])
case("LayerNormalization", 17, [rand(2, 3, 8), Const(rand(8)), Const(rand(8))])
case("LayerNormalization", 17, [rand(2, 3, 4), Const(rand(3, 4))], "axis1-stats", n_outputs=3, axis=1,
     epsilon=1e-3)
case("LRN", 13, [P], "size3", size=3)
case("LRN", 13, [rand(2, 6, 4, 5)], "size5", size=5, alpha=0.01, beta=0.5, bias=2.0)
case("Softmax", 11, [rand(2, 3, 4)], "coerced")
case("Softmax", 11, [rand(2, 3, 4)], "coerced-axis2", axis=2)
case("Softmax", 13, [rand(2, 3, 4)], "axis1", axis=1)
case("LogSoftmax", 13, [rand(2, 3, 4)])
case("LogSoftmax", 11, [rand(2, 3, 4)], "coerced", axis=0)

# reductions and padding
R = rand(2, 3, 4, 5)
case("ReduceMean", 13, [R], "axes-attr", axes=[2, 3])
case("ReduceMean", 13, [R], "all-keepdims0", keepdims=0)
case("ReduceMean", 18, [R, ints(-1, 1)], "axes-input", keepdims=0)
case("ReduceMean", 18, [R], "no-axes")
case("ReduceMean", 18, [R], "noop", noop_with_empty_axes=1)
case("ReduceSum", 11, [R], "attr", axes=[1])
case("ReduceSum", 13, [R, ints(1, 2)], "input")
case("ReduceMax", 13, [R], axes=[-1], keepdims=0)
case("ReduceMin", 18, [R, ints(0)])
case("Pad", 7, [R], "attr-constant", pads=[0, 0, 1, 2, 0, 1, 2, 0], value=1.5)
case("Pad", 7, [R], "attr-reflect", mode="reflect", pads=[0, 0, 1, 2, 0, 0, 2, 3])
case("Pad", 7, [R], "attr-edge", mode="edge", pads=[0, 0, 1, 2, 0, 0, 2, 3])
case("Pad", 11, [R, ints(0, 0, 1, 1, 0, 0, 1, 1)], "input")
case("Pad", 11, [R, ints(1, 0, 1, 1, 0, 2, 1, 1), scalar(-1.0)], "value-batch")
case("Pad", 11, [R, ints(0, 0, 2, 1, 0, 0, 1, 2)], "reflect", mode="reflect")
case("Pad", 13, [R, ints(0, 0, 2, 1, 0, 0, 1, 2)], "edge", mode="edge")
case("Pad", 13, [R, ints(0, 0, -1, 2, 0, 0, 1, -2)], "negative")
case("Pad", 13, [R, ints(0, 0, -1, 2, 0, 0, 1, -2)], "negative-reflect", mode="reflect")
case("Pad", 13, [rand(3, 4, 5), ints(0, 2, 2, 0, 1, 2)], "reflect-3d", mode="reflect")
case("Pad", 18, [R, ints(1, 2, 3, 0), None, ints(1, -1)], "axes")
case("Pad", 19, [R, ints(0, 0, 1, 2, 0, 0, 2, 1)], "wrap", mode="wrap")

# resizing
Z = rand(1, 2, 4, 5)
for opset, inputs in ((10, [Z, floats(1, 1, 2, 3)]), (10, [Z, floats(1, 1, 0.5, 0.6)])):
    for mode in ("nearest", "linear"):
        case("Resize", opset, inputs, f"{mode}-{inputs[1].value[2]}", mode=mode)
case("Upsample", 7, [Z], "attr", scales=[1.0, 1.0, 2.0, 2.0])
case("Upsample", 9, [Z, floats(1, 1, 2, 1.5)], "input-linear", mode="linear")
SCALES = {"up": floats(1, 1, 2, 1.5), "down": floats(1, 1, 0.6, 0.5)}
for transform in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"):
    for direction, scales in SCALES.items():
        for nearest_mode in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
            case("Resize", 13, [Z, None, scales], f"nearest-{transform}-{nearest_mode}-{direction}",
                 mode="nearest", coordinate_transformation_mode=transform, nearest_mode=nearest_mode)
        if transform != "tf_half_pixel_for_nn":
            case("Resize", 13, [Z, None, scales], f"linear-{transform}-{direction}", mode="linear",
                 coordinate_transformation_mode=transform)
case("Resize", 11, [Z, floats(), floats(1, 1, 2, 2)], "empty-roi", mode="linear")
case("Resize", 11, [Z, floats(), floats(), ints(1, 2, 7, 3)], "sizes", mode="linear",
     coordinate_transformation_mode="align_corners")
case("Resize", 13, [Z, None, None, ints(1, 2, 9, 9)], "sizes-nearest")
case("Resize", 13, [rand(2, 3, 4), None, floats(1, 1, 2.5)], "3d-linear", mode="linear")
case("Resize", 13, [rand(1, 2, 3, 4, 5), None, floats(1, 1, 2, 0.5, 1.5)], "5d-linear", mode="linear")
case("Resize", 13, [Z, None, floats(1, 1, 2, 1.5)], "cubic", mode="cubic")
case("Resize", 13, [Z, None, floats(1, 1, 0.7, 2)], "cubic-exclude", mode="cubic", exclude_outside=1,
     cubic_coeff_a=-0.5)
case("Resize", 13, [Z, floats(0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2), floats(1, 1, 2, 2)], "crop-linear",
     mode="linear", coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=3.0)
case("Resize", 13, [Z, floats(0, 0, -0.2, 0.1, 1, 1, 0.9, 1.2), None, ints(1, 2, 5, 1)], "crop-nearest",
     mode="nearest", coordinate_transformation_mode="tf_crop_and_resize")
case("Resize", 18, [Z, None, floats(2, 1.5)], "axes", mode="linear", axes=[2, 3])
case("Resize", 18, [Z, None, None, ints(6, 6)], "negative-axes", axes=[-2, -1])
case("Resize", 18, [Z, None, None, ints(6, 6)], "not-larger", axes=[2, 3], keep_aspect_ratio_policy="not_larger")
case("Resize", 18, [Z, None, None, ints(6, 6)], "not-smaller", axes=[2, 3], mode="linear",
     keep_aspect_ratio_policy="not_smaller")
case("Resize", 19, [Z, None, floats(1, 1, 1.7, 0.6)], "half-pixel-symmetric", mode="linear",
     coordinate_transformation_mode="half_pixel_symmetric")


@pytest.mark.parametrize(("op", "opset", "inputs", "attrs", "n_outputs"), CASES)
def test_op_matches_onnxruntime(op: str, opset: int, inputs: list, attrs: dict, n_outputs: int) -> None:
    model, feeds = build_model(op, opset, inputs, attrs, n_outputs)
    assert_matches_onnxruntime(model, feeds, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ graphs and API


def shape_subgraph_model() -> onnx.ModelProto:
    """Conv -> Shape -> Gather -> Unsqueeze -> Concat -> Reshape (a flatten with a dynamic batch), old-IR style:
    the initializers are also listed as graph inputs."""
    weight = numpy_helper.from_array(rand(4, 3, 3, 3), "w")
    index = numpy_helper.from_array(np.array(0, np.int64), "i")
    rest = numpy_helper.from_array(np.array([-1], np.int64), "rest")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Shape", ["relu"], ["shape"]),
        helper.make_node("Gather", ["shape", "i"], ["batch"]),
        helper.make_node("Unsqueeze", ["batch"], ["batch1"], axes=[0]),
        helper.make_node("Concat", ["batch1", "rest"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["relu", "new_shape"], ["flat"]),
        helper.make_node("ReduceSum", ["flat"], ["total"], axes=[1], keepdims=0),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in (weight, index, rest)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("flat", "total")]
    graph = helper.make_graph(nodes, "shape_subgraph", inputs, outputs, initializer=[weight, index, rest])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=3)


def test_shape_subgraph_and_old_ir_initializer_inputs() -> None:
    model = shape_subgraph_model()
    module = OnnxTorchModule(model)
    assert module.input_names == ["x"]
    assert module.output_names == ["flat", "total"]
    assert check_against_onnxruntime(module, model, {"x": rand(2, 3, 6, 6)}, rtol=1e-5) <= 1e-5
    first = module(torch.from_numpy(rand(3, 3, 6, 6)))
    assert first[0].shape == (3, 4 * 36)


def test_positional_and_named_inputs_agree_and_bad_calls_fail() -> None:
    module = OnnxTorchModule(shape_subgraph_model())
    x = torch.from_numpy(rand(1, 3, 6, 6))
    assert torch.equal(module(x)[1], module(x=x)[1])
    with pytest.raises(TypeError):
        module()
    with pytest.raises(TypeError):
        module(x, x=x)
    with pytest.raises(KeyError, match="nope"):
        module(x, hooks={"nope": lambda t: t})


def test_intermediate_tensors_are_released_after_last_use() -> None:
    module = OnnxTorchModule(shape_subgraph_model())
    released = {name for step in module._steps for name in step.release}
    assert {"x", "conv", "relu", "shape", "batch", "new_shape"} <= released
    assert not released & {"flat", "total"}


def test_hook_gives_gate_gradient() -> None:
    model = shape_subgraph_model()
    module = OnnxTorchModule(model)
    gate = torch.ones(1, 4, 1, 1, requires_grad=True)
    flat, total = module(torch.from_numpy(rand(2, 3, 6, 6)), hooks={"conv": lambda t: t * gate})
    total.square().sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    zeroed = module(torch.from_numpy(rand(2, 3, 6, 6)), hooks={"conv": lambda t: t * 0})[1]
    assert torch.count_nonzero(zeroed) == 0


def test_unsupported_ops_are_named_before_any_work() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("FrobnicateX", ["a"], ["b"]),
             helper.make_node("FusedThing", ["b"], ["y"], domain="com.example")]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    assert unsupported_ops(model) == ["FrobnicateX", "com.example::FusedThing"]
    with pytest.raises(UnsupportedModelError, match="FrobnicateX.*com.example::FusedThing"):
        OnnxTorchModule(model)


def test_unsupported_variant_raises_when_run() -> None:
    model, feeds = build_model("MaxPool", 12, [rand(1, 1, 4, 4)], {"kernel_shape": [2, 2]}, n_outputs=2)
    module = OnnxTorchModule(model)
    with pytest.raises(UnsupportedModelError, match="MaxPool.*output #1"):
        module(torch.from_numpy(feeds["x0"]))


def test_check_against_onnxruntime_reports_differences() -> None:
    model, feeds = build_model("Relu", 13, [rand(3, 4)], {})
    module = OnnxTorchModule(model)
    module._steps[0] = dataclasses.replace(module._steps[0], fn=lambda attrs, inputs, opset: inputs[0] * 2)
    with pytest.raises(UnsupportedModelError, match=r"differs from onnxruntime by .* \(limit 0.0001\)"):
        check_against_onnxruntime(module, model, feeds)


def test_mixed_devices_follow_the_activations() -> None:
    shape = torch.tensor([2, 3])  # CPU int64, as Shape makes it
    moved = _same_device([torch.zeros(2, 3, device="meta"), shape])
    assert [t.device.type for t in moved] == ["meta", "meta"]
    moved = _same_device([torch.zeros(2), torch.ones(2, device="meta"), None])
    assert [t.device.type for t in moved[:2]] == ["meta", "meta"] and moved[2] is None
    assert _same_device([shape, shape + 1])[0] is shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda() -> None:
    model = shape_subgraph_model()
    module = OnnxTorchModule(model).to("cuda")
    assert check_against_onnxruntime(module, model, {"x": rand(2, 3, 6, 6)}) <= 1e-4
    assert all(t.device.type == "cuda" for t in module(torch.from_numpy(rand(1, 3, 6, 6)).cuda()))


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_precision_initializers_compute_in_their_dtype(dtype: int) -> None:
    weight = rand(4, 3, 3, 3)
    proto = helper.make_tensor("w", dtype, weight.shape, weight.flatten().tolist())
    torch_dtype = {TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}[dtype]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", dtype, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", dtype, None)], initializer=[proto])
    module = OnnxTorchModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = torch.from_numpy(rand(1, 3, 5, 5))
    (y,) = module(x.to(torch_dtype))
    expected = torch.relu(torch.nn.functional.conv2d(x, torch.from_numpy(weight).to(torch_dtype).float(), padding=1))
    assert y.dtype == torch_dtype
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)


def test_local_functions_are_inlined() -> None:
    function = helper.make_function("local", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                    opset_imports=[helper.make_opsetid("", 13)])
    graph = helper.make_graph([helper.make_node("Double", ["x"], ["y"], domain="local")], "fn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, functions=[function], ir_version=10,
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("local", 1)])
    assert unsupported_ops(model) == []
    assert check_against_onnxruntime(OnnxTorchModule(model), model, {"x": rand(3)}) == 0.0


# ------------------------------------------------------------------------------------------------- whole models

TORCHVISION = {  # name -> (constructor keyword arguments, exports to test)
    "resnet18": ({}, [(False, 13), (True, 18)]),
    "mobilenet_v3_small": ({}, [(False, 17), (True, 18)]),
    "squeezenet1_0": ({}, [(False, 13)]),
    "googlenet": ({"aux_logits": False, "init_weights": True}, [(False, 17)]),
    "densenet121": ({}, [(False, 13)]),
}
EXPORTS = [pytest.param(name, dynamo, opset, id=f"{name}-{'dynamo' if dynamo else 'torchscript'}-{opset}")
           for name, (_, exports) in TORCHVISION.items() for dynamo, opset in exports]


@pytest.fixture(scope="session")
def torchvision_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool, int], Path]:
    """Lazily exported torchvision models (random weights, 1x3x64x64), each exported once per session."""
    torchvision = pytest.importorskip("torchvision")
    folder = tmp_path_factory.mktemp("torchvision_onnx")

    class Exports(dict):
        def __missing__(self, key: tuple[str, bool, int]) -> Path:
            name, dynamo, opset = key
            torch.manual_seed(0)
            network = getattr(torchvision.models, name)(weights=None, **TORCHVISION[name][0]).eval()
            path = folder / f"{name}-{int(dynamo)}-{opset}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(network, (torch.randn(1, 3, 64, 64),), str(path), dynamo=dynamo,
                                  opset_version=opset, input_names=["input"], verbose=False)
            self[key] = path
            return path

    return Exports()


@pytest.mark.parametrize(("name", "dynamo", "opset"), EXPORTS)
def test_torchvision_export_matches_onnxruntime(torchvision_exports: dict, name: str, dynamo: bool,
                                                opset: int) -> None:
    model = onnx.load(str(torchvision_exports[name, dynamo, opset]))
    module = OnnxTorchModule(model)
    (input_name,) = module.input_names
    assert check_against_onnxruntime(module, model, {input_name: rand(1, 3, 64, 64)}) <= 1e-4


@pytest.mark.parametrize(("filename", "shape"), [("resnet20_cifar10.onnx", (2, 3, 32, 32)),
                                                 ("efficientnet_lite0_imagenet.onnx", (1, 3, 224, 224))])
def test_shared_model_matches_onnxruntime(filename: str, shape: tuple[int, ...]) -> None:
    path = SHARED_MODELS / filename
    if not path.exists():
        pytest.skip(f"{path} is not available")
    model = onnx.load(str(path))
    module = OnnxTorchModule(model)
    (input_name,) = module.input_names
    assert check_against_onnxruntime(module, model, {input_name: rand(*shape)}) <= 1e-4


def test_gradient_through_exported_conv_output(torchvision_exports: dict) -> None:
    model = onnx.load(str(torchvision_exports["resnet18", True, 18]))
    module = OnnxTorchModule(model)
    conv = next(node for node in model.graph.node if node.op_type == "Conv").output[0]
    gate = torch.ones(1, 64, 1, 1, requires_grad=True)
    (logits,) = module(torch.from_numpy(rand(1, 3, 64, 64)), hooks={conv: lambda t: t * gate})
    logits.square().mean().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
