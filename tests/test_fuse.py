"""FuseLinearPass / fuse_linear: consecutive pointwise linear nodes merged when exact and not costlier."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import assert_same_outputs, low_rank_weight, make_model, tensor
from onnx import TensorProto, helper

from onnx_basisprune.plan import ranks
from onnx_basisprune.api import prune
from onnx_basisprune.pipeline.prepared import apply_plan, prepare
from onnx_basisprune.io.cost import model_cost
from onnx_basisprune.basis.fuse import fuse_linear
from onnx_basisprune.basis.rewrite import META_LAYER, META_ROLE

F32, F16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE


def conv(name: str, x: str, y: str, in_ch: int, out_ch: int, rng: np.random.Generator, *, groups: int = 1,
         bias: bool = True, spatial: int = 2, dtype: int = F32) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """A 1x1 Conv ``x -> y`` with random weights and its initializers."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    w = rng.standard_normal((out_ch, in_ch // groups, *[1] * spatial)) / np.sqrt(in_ch // groups)
    inits = [tensor(f"{name}.W", w.astype(np_dtype))]
    if bias:
        inits.append(tensor(f"{name}.B", rng.standard_normal(out_ch).astype(np_dtype)))
    node = helper.make_node("Conv", [x, *(i.name for i in inits)], [y], name=name, group=groups, kernel_shape=[1] * spatial)
    return node, inits


def conv_chain(channels: list[int], groups: list[int] | None = None, biases: list[bool] | None = None, *,
               spatial: int = 2, dtype: int = F32, relu_after: int | None = None, **kwargs) -> onnx.ModelProto:
    """``x -> Conv -> ... -> Conv -> y`` through ``channels`` (a Relu after conv ``relu_after``)."""
    rng = np.random.default_rng(len(channels))
    nodes, inits = [], []
    n = len(channels) - 1
    for i in range(n):
        src = "x" if i == 0 else f"h{i}"
        dst = "y" if i == n - 1 else f"h{i + 1}" if relu_after != i else f"r{i}"
        node, params = conv(f"conv{i}", src, dst, channels[i], channels[i + 1], rng, groups=(groups or [1] * n)[i],
                            bias=(biases or [True] * n)[i], spatial=spatial, dtype=dtype)
        nodes.append(node)
        inits += params
        if relu_after == i:
            nodes.append(helper.make_node("Relu", [dst], [f"h{i + 1}"], name="relu"))
    dims = [5, 6, 7][:spatial]
    return make_model(nodes, [("x", dtype, ["N", channels[0], *dims])], [("y", dtype, ["N", channels[-1], *dims])],
                      inits, **kwargs)


def gemm_chain(first: dict, second: dict, k: int = 16, r: int = 24, n: int = 12, batch: int | str = "N",
               x_dims: list | None = None, dtype: int = F32) -> onnx.ModelProto:
    """``x -> first -> second -> y``, each a dict with ``op`` (Gemm/MatMul), Gemm attributes and
    ``bias`` (a shape, or None)."""
    rng = np.random.default_rng(7)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    nodes, inits = [], []
    for i, (spec, src, dst, fan_in, out) in enumerate([(first, "x", "h", k, r), (second, "h", "y", r, n)]):
        spec = dict(spec)
        op, bias = spec.pop("op"), spec.pop("bias", None)
        trans = spec.get("transB", 0)
        w = rng.standard_normal((out, fan_in) if trans else (fan_in, out)) / np.sqrt(fan_in)
        names = [f"g{i}.W"]
        inits.append(tensor(names[0], w.astype(np_dtype)))
        if bias is not None:
            names.append(f"g{i}.C")
            inits.append(tensor(names[1], rng.standard_normal(bias).astype(np_dtype)))
        nodes.append(helper.make_node(op, [src, *names], [dst], name=f"g{i}", **spec))
    dims = x_dims if x_dims is not None else [batch, k]
    rows = dims[-1:] if first.get("transA") else dims[:-1]
    return make_model(nodes, [("x", dtype, dims)], [("y", dtype, [*rows, n])], inits)


def fuse_and_check(proto: onnx.ModelProto, merges: int, tol: float = 1e-4) -> onnx.ModelProto:
    """Fuse ``proto``: ``merges`` merges, a valid model, fewer nodes and the same outputs when
    merged, the input model untouched and no initializer left unused."""
    model = ir.serde.deserialize_model(proto)
    before = ir.to_proto(model).SerializeToString()
    fused, count = fuse_linear(model)
    assert ir.to_proto(model).SerializeToString() == before
    assert count == merges
    out = ir.to_proto(fused)
    onnx.checker.check_model(out, full_check=True)
    if merges:
        assert len(out.graph.node) == len(proto.graph.node) - merges
        assert_same_outputs(proto, out, tol=tol)
    else:
        assert len(out.graph.node) == len(proto.graph.node)
    used = {name for node in out.graph.node for name in node.input}
    assert all(init.name in used for init in out.graph.initializer)
    return out


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize(
    ("channels", "groups", "biases", "fused_group"),
    [
        ([8, 16, 12], [1, 1], [True, True], 1),
        ([8, 16, 12], [1, 1], [False, False], 1),
        ([8, 16, 12], [1, 1], [True, False], 1),
        ([24, 8, 12], [1, 1], [False, True], 1),  # fused MACs equal to the pair's: still merged
        ([8, 16, 12], [2, 1], [False, True], 1),  # block-diagonal A into a dense B
        ([8, 16, 12], [4, 2], [True, True], 2),  # gcd of the groups
        ([8, 16, 8], [2, 2], [True, True], 2),
        ([16, 16, 16], [16, 1], [True, True], 1),  # depthwise 1x1 (a channel scaling)
    ],
)
def test_conv_pair_merges(channels, groups, biases, fused_group):
    out = fuse_and_check(conv_chain(channels, groups, biases), 1)
    (node,) = out.graph.node
    assert node.op_type == "Conv" and attrs(node)["group"] == fused_group
    assert {p.key: p.value for p in node.metadata_props} == {META_ROLE: "fused"}
    assert (len(node.input) == 3) == any(biases)


def test_conv_pair_float16():
    out = fuse_and_check(conv_chain([8, 16, 12], dtype=F16), 1, tol=1e-2)
    assert {init.data_type for init in out.graph.initializer} == {F16}


def test_conv1d_chain_of_three_merges_twice():
    out = fuse_and_check(conv_chain([8, 16, 16, 12], spatial=1), 2)
    assert [n.op_type for n in out.graph.node] == ["Conv"]


@pytest.mark.parametrize(
    "proto",
    [
        pytest.param(conv_chain([8, 16, 12], relu_after=0), id="relu-between"),
        pytest.param(conv_chain([64, 4, 64]), id="rank-4-pair-would-cost-more"),
        pytest.param(conv_chain([8, 16, 12], initializers_as_inputs=True), id="weights-overridable-inputs"),
    ],
)
def test_conv_pair_refused(proto):
    fuse_and_check(proto, 0)


def test_two_consumers_or_graph_output_refused():
    rng = np.random.default_rng(0)
    a, ia = conv("a", "x", "h", 8, 16, rng)
    b, ib = conv("b", "h", "y", 16, 12, rng)
    c, ic = conv("c", "h", "z", 16, 4, rng)
    x = [("x", F32, ["N", 8, 5, 5])]
    y, z, h = (("y", F32, ["N", 12, 5, 5]), ("z", F32, ["N", 4, 5, 5]), ("h", F32, ["N", 16, 5, 5]))
    fuse_and_check(make_model([a, b, c], x, [y, z], ia + ib + ic), 0)
    fuse_and_check(make_model([a, b], x, [y, h], ia + ib), 0)


def test_strided_or_padded_conv_refused():
    rng = np.random.default_rng(0)
    a, ia = conv("a", "x", "h", 8, 16, rng)
    b, ib = conv("b", "h", "y", 16, 12, rng)
    a.attribute.append(helper.make_attribute("strides", [2, 2]))
    b.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    fuse_and_check(make_model([a, b], [("x", F32, ["N", 8, 6, 6])], [("y", F32, ["N", 12, 5, 5])], ia + ib), 0)


@pytest.mark.parametrize("trans_first", [0, 1])
@pytest.mark.parametrize("trans_second", [0, 1])
def test_gemm_pair_merges(trans_first, trans_second):
    first = {"op": "Gemm", "transB": trans_first, "alpha": 0.5, "beta": 2.0, "bias": (24,)}
    second = {"op": "Gemm", "transB": trans_second, "bias": (1, 12)}
    out = fuse_and_check(gemm_chain(first, second), 1)
    (node,) = out.graph.node
    assert node.op_type == "Gemm" and len(node.input) == 3


@pytest.mark.parametrize(
    ("first", "second", "op"),
    [
        ({"op": "Gemm", "transB": 1, "bias": (24,)}, {"op": "MatMul"}, "Gemm"),
        ({"op": "MatMul"}, {"op": "Gemm", "bias": ()}, "Gemm"),
        ({"op": "Gemm", "transB": 1}, {"op": "MatMul"}, "MatMul"),
    ],
)
def test_gemm_matmul_mix_merges(first, second, op):
    (node,) = fuse_and_check(gemm_chain(first, second), 1).graph.node
    assert node.op_type == op


def test_matmul_pair_on_3d_input_merges():
    out = fuse_and_check(gemm_chain({"op": "MatMul"}, {"op": "MatMul"}, x_dims=["N", 3, 16]), 1)
    assert [n.op_type for n in out.graph.node] == ["MatMul"]


@pytest.mark.parametrize(("dtype", "tol"), [(F16, 1e-2), (F64, 1e-12)])
def test_gemm_pair_other_dtypes(dtype, tol):
    proto = gemm_chain({"op": "Gemm", "transB": 1, "bias": (24,)}, {"op": "Gemm", "bias": (12,)}, dtype=dtype)
    out = fuse_and_check(proto, 1, tol=tol)
    assert {init.data_type for init in out.graph.initializer} == {dtype}


@pytest.mark.parametrize(
    "proto",
    [
        pytest.param(gemm_chain({"op": "Gemm", "bias": (2, 24)}, {"op": "Gemm"}, batch=2), id="per-row-bias"),
        pytest.param(gemm_chain({"op": "Gemm", "transA": 1}, {"op": "Gemm"}, x_dims=[16, 2]), id="transA"),
        pytest.param(gemm_chain({"op": "Gemm"}, {"op": "Gemm"}, k=64, r=4, n=64), id="would-cost-more"),
    ],
)
def test_gemm_pair_refused(proto):
    fuse_and_check(proto, 0)


def test_metadata_layers_joined():
    model = ir.serde.deserialize_model(conv_chain([8, 16, 16, 12]))
    for node, layer in zip(model.graph, ["conv1x", "conv1x", "conv2x"]):
        node.metadata_props.update({META_ROLE: "scaling", META_LAYER: layer})
    fused, count = fuse_linear(model)
    assert count == 2
    (node,) = fused.graph
    assert node.metadata_props == {META_ROLE: "fused", META_LAYER: "conv1x,conv2x"}


def test_fuses_a_pruned_model():
    """A Conv3x3 -> Conv1x1 -> Conv1x1 model split by ``prune``: every 1x1 after the 3x3 basis
    (scaling, basis, scaling, basis, scaling) is linear, so at low ranks they merge into one
    r0 -> 48 Conv, with the same outputs and fewer MACs."""
    rng = np.random.default_rng(3)
    c = 48
    w0 = low_rank_weight(rng, c, 8 * 9, decay=3.0).reshape(c, 8, 3, 3)
    w1, w2 = (low_rank_weight(rng, c, c, decay=3.0).reshape(c, c, 1, 1) for _ in range(2))
    inits = [tensor(f"W{i}", w) for i, w in enumerate([w0, w1, w2])]
    inits += [tensor(f"B{i}", rng.standard_normal(c).astype(np.float32)) for i in range(3)]
    nodes = [
        helper.make_node("Conv", ["x", "W0", "B0"], ["h0"], name="conv0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h0", "W1", "B1"], ["h1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["h1", "W2", "B2"], ["y"], name="conv2", kernel_shape=[1, 1]),
    ]
    proto = make_model(nodes, [("x", F32, [1, 8, 12, 12])], [("y", F32, [1, c, 12, 12])], inits)
    prepared = prepare(proto)
    plan = ranks.energy_plan(prepared.layers, 0.9, ranks.block_size("cpu"))
    split = apply_plan(prepared, plan, fuse=False)
    assert [layer.action for layer in split.layers] == ["decomposed"] * 3
    fused, count = fuse_linear(split.model)
    assert count == 4
    fuse_and_check(split.to_proto(), 4)
    result = prune(proto, energy=0.9)  # what the tool writes: fused already
    assert fuse_linear(result.model)[1] == 0 and len(result.model.graph) == 2
    assert result.pruned.macs == model_cost(fused).macs < split.pruned.macs
    basis, merged = fused.graph
    assert basis.metadata_props[META_ROLE] == "basis"
    assert merged.metadata_props == {META_ROLE: "fused", META_LAYER: "conv0,conv1,conv2"}
    assert merged.inputs[1].const_value.shape == (c, split.layers[0].kept_rank, 1, 1)
