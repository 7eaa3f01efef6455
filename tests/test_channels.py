"""Channel coupling and exact channel removal (onnx_basisprune.channels.analysis / channels.rewrite).

Every case analyses a normalised model, removes a random 40 % of the prunable channel groups and
checks the exactness contract: the channel-removed model gives the gated model's outputs (gates 0
for the removed groups) on onnxruntime CPU, passes the full ONNX checker, its Conv/Gemm/MatMul
weights really shrank, and ``analysis.cost`` equals what onnx_basisprune.io.cost measures on it.
Small hand-built graphs cover each coupling rule and each "unprunable, with reason" case;
torchvision models (random weights, randomised BatchNorm) and the ../shared models cover real
exports from both exporters.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import make_model, max_rel_error, random_feeds, run, shared_model
from onnx import TensorProto, helper, numpy_helper

from onnx_basisprune.pipeline.prepared import as_ir as _as_ir, prepare
from onnx_basisprune.channels.rewrite import RemoveChannelsPass, gated_model, remove_channels
from onnx_basisprune.channels.analysis import ChannelAnalysis, analyse_channels
from onnx_basisprune.io.cost import count_params, model_cost
from onnx_basisprune.io.normalize import normalize
from onnx_basisprune.io.shapes import infer_shapes

TOL = 1e-5
F = TensorProto.FLOAT
INT_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------------
# Helpers


def normalised(src) -> tuple[ir.Model, object]:
    """The model and ShapeTable ``prepare`` gives, without its SVDs (slow for large Gemm layers)."""
    model = _as_ir(src)
    normalize(model)
    return model, infer_shapes(model)


def choose(analysis: ChannelAnalysis, fraction: float, seed: int) -> list[int]:
    """A random ``fraction`` of the prunable groups that leaves every tensor at least one channel."""
    removable = analysis.removable()
    if not removable:
        return []
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(removable, size=max(1, round(fraction * len(removable))), replace=False).tolist())
    while empty := analysis.emptied(analysis.removed_mask(chosen)):
        chosen.remove(next(g for g in sorted(chosen) if empty[0] in analysis.groups[g].elements))
    return sorted(chosen)


def weight_of(node: ir.Node) -> np.ndarray:
    return node.inputs[1].const_value.numpy()


def check_weights(original: ir.Model, removed_model: ir.Model, analysis: ChannelAnalysis, chosen: list[int]) -> None:
    """Each layer's weight keeps exactly the channels whose groups were not removed."""
    gone = set(chosen)
    nodes = {n.name: n for n in removed_model.graph}
    before = {n.name: n for n in original.graph}
    shrank = 0
    for name, (out_g, in_g) in analysis.layer_channels().items():
        node = nodes[name]
        w = weight_of(node)
        kept_out = int(sum(g not in gone for g in out_g.tolist()))
        kept_in = int(sum(g not in gone for g in in_g.tolist()))
        if node.op_type == "Conv":
            group = node.attributes.get_int("group", 1)
            assert w.shape[0] == kept_out, name
            if group == 1:
                assert w.shape[1] == kept_in, name
            elif w.shape[1] == 1 and group == w.shape[0]:
                assert group == kept_out == kept_in, name
        elif node.op_type == "Gemm":
            expect = (kept_out, kept_in) if node.attributes.get_int("transB", 0) else (kept_in, kept_out)
            assert w.shape == expect, name
        else:
            assert w.shape == (kept_in, kept_out), name
        shrank += w.size < weight_of(before[name]).size
    assert shrank or not chosen


def check_exact(model: ir.Model, shapes, *, fraction: float = 0.4, seed: int = 0, batch: int = 2,
                check_ones: bool = True) -> dict:
    """Analyse, remove a random ``fraction`` of the prunable groups, compare with the gated model."""
    before = ir.to_proto(model).SerializeToString()
    start = time.perf_counter()
    analysis = analyse_channels(model, shapes)
    seconds = time.perf_counter() - start
    chosen = choose(analysis, fraction, seed)
    masks = np.ones(len(analysis.groups))
    masks[chosen] = 0.0
    gated = ir.to_proto(gated_model(model, analysis, masks))
    removed_model = remove_channels(model, analysis, chosen)
    removed = ir.to_proto(removed_model)
    onnx.checker.check_model(removed, full_check=True)
    feeds = random_feeds(gated, batch=batch, seed=seed)
    reference, got = run(gated, feeds), run(removed, feeds)
    error = max(max_rel_error(r, g) for r, g in zip(reference, got))
    assert error <= TOL, f"max relative error {error:.3g}"
    if check_ones:
        ones = ir.to_proto(gated_model(model, analysis, np.ones(len(analysis.groups))))
        original = run(ir.to_proto(model), feeds)
        assert all(np.array_equal(a, b) for a, b in zip(original, run(ones, feeds)))
    check_weights(model, removed_model, analysis, chosen)
    params, macs = analysis.cost(analysis.removed_mask(chosen))
    measured = model_cost(removed_model)
    assert (params, macs) == (count_params(removed_model), measured.macs)
    assert analysis.cost(np.zeros(len(analysis.groups), dtype=bool)) == (count_params(model), model_cost(model, shapes).macs)
    assert ir.to_proto(model).SerializeToString() == before, "the input model was modified"
    return {
        "groups": len(analysis.groups),
        "prunable": len(analysis.removable()),
        "removed": len(chosen),
        "sites": len(analysis.sites),
        "error": error,
        "params_ratio": params / count_params(model),
        "analysis_s": seconds,
        "analysis": analysis,
    }


class Builder:
    """A small ONNX graph with random weights, built node by node."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.opset, self.k = [], [], opset, 0

    def name(self, op: str) -> str:
        self.k += 1
        return f"{op.lower()}{self.k}"

    def const(self, array, name: str | None = None) -> str:
        name = name or self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array), name=name))  # keeps 0-d arrays 0-d
        return name

    def rand(self, *shape, scale: float = 1.0) -> str:
        return self.const((scale * self.rng.standard_normal(shape)).astype(np.float32))

    def op(self, op: str, inputs, outputs: int = 1, name: str | None = None, **attrs):
        name = name or self.name(op)
        outs = [f"{name}.out{i}" if outputs > 1 else f"{name}.out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def conv(self, x, cin, cout, k=3, group=1, bias=True, name=None, stride=1):
        w = self.rand(cout, cin // group, k, k, scale=1 / np.sqrt(cin // group * k * k))
        inputs = [x, w] + ([self.rand(cout, scale=0.5)] if bias else [])
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride] * 2)

    def gemm(self, x, k, n, trans_b=1, name=None, bias=True):
        w = self.rand(*((n, k) if trans_b else (k, n)), scale=1 / np.sqrt(k))
        return self.op("Gemm", [x, w] + ([self.rand(n)] if bias else []), name=name, transB=trans_b)

    def model(self, inputs, outputs) -> onnx.ModelProto:
        return make_model(self.nodes, inputs, outputs, self.inits, opset=self.opset)


def image(c=3, h=8, w=8):
    return [("x", F, ["N", c, h, w])]


def out(name="y", dims=("N", None, None, None)):
    return [(name, F, list(dims))]


def check_graph(proto: onnx.ModelProto, **kwargs) -> dict:
    model, shapes = normalised(proto)
    return check_exact(model, shapes, **kwargs)


def group_of(analysis: ChannelAnalysis, tensor_name: str, channel: int) -> int:
    for group in analysis.groups:
        if channel in group.elements.get(tensor_name, []):
            return group.index
    raise KeyError((tensor_name, channel))


def site_tensors(analysis: ChannelAnalysis) -> set[str]:
    return {s.tensor for s in analysis.sites}


# ---------------------------------------------------------------------------------------------
# Coupling rules on small graphs


def test_chain_groups_sites_and_reasons():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    c = b.op("Relu", [b.conv(a, 8, 6, name="b")])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [c])])
    b.gemm(flat, 6, 5, name="fc")
    proto = b.model(image(), out("fc.out", ["N", 5]))
    summary = check_graph(proto)
    analysis = summary["analysis"]
    assert summary["prunable"] == 14
    for group in analysis.groups:
        if group.prunable:
            assert (group.producers, group.consumers) in ((["a"], ["b"]), (["b"], ["fc"]))
        else:
            assert group.reason in ("graph input 'x'", "reaches graph output 'fc.out'")
    assert site_tensors(analysis) == {"a.out", "b.out"}
    out_g, in_g = analysis.layer_channels()["b"]
    assert len(out_g) == 6 and len(in_g) == 8 and (out_g >= 0).all() and (in_g >= 0).all()
    assert (analysis.layer_channels()["a"][1] == -1).all()  # the network input


def test_residual_add_shares_one_group_per_channel():
    b = Builder()
    r0 = b.op("Relu", [b.conv("x", 3, 8, name="stem")])
    h = b.op("Relu", [b.conv(r0, 8, 8, name="conv1")])
    s = b.op("Add", [b.conv(h, 8, 8, name="conv2"), r0])
    y = b.conv(b.op("Relu", [s]), 8, 4, name="head")
    summary = check_graph(b.model(image(), out(y)))
    analysis = summary["analysis"]
    stream = {group_of(analysis, "stem.out", c) for c in range(8)}
    assert len(stream) == 8
    for g in stream:
        group = analysis.groups[g]
        assert sorted(group.producers) == ["conv2", "stem"] and sorted(group.consumers) == ["conv1", "head"]
    assert summary["prunable"] == 16


def test_concat_offsets():
    b = Builder()
    cat = b.op("Concat", [b.conv("x", 3, 4, name="a"), b.conv("x", 3, 6, name="b")], axis=1, name="cat")
    y = b.conv(b.op("Relu", [cat]), 10, 5, name="c")
    summary = check_graph(b.model(image(), out(y)))
    analysis = summary["analysis"]
    for c in range(6):
        g = analysis.groups[group_of(analysis, "b.out", c)]
        assert g.elements["cat.out"] == [4 + c] and g.producers == ["b"] and g.consumers == ["c"]


@pytest.mark.parametrize("opset,form", [(11, "attr"), (13, "input"), (13, "equal"), (18, "num_outputs")])
def test_split_on_channel_axis(opset, form):
    b = Builder(opset=opset)
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    sizes = [3, 5] if form in ("attr", "input") else [4, 4]
    attrs = {"axis": 1}
    inputs = [a]
    if form == "attr":
        attrs["split"] = sizes
    elif form == "input":
        inputs.append(b.const(np.array(sizes, dtype=np.int64)))
    elif form == "num_outputs":
        attrs["num_outputs"] = 2
    s0, s1 = b.op("Split", inputs, outputs=2, name="split", **attrs)
    cat = b.op("Concat", [b.conv(s1, sizes[1], 4, name="p"), b.conv(s0, sizes[0], 2, name="q")], axis=1)
    y = b.conv(cat, 6, 3, name="r")
    summary = check_graph(b.model(image(), out(y)), fraction=0.5)
    analysis = summary["analysis"]
    assert analysis.groups[group_of(analysis, "split.out1", 0)].elements["a.out"] == [sizes[0]]
    assert summary["prunable"] == 8 + 6


def test_slice_on_channel_axis_and_strided_slice_is_unprunable():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 10, name="a")])
    c64 = lambda v: b.const(np.array(v, dtype=np.int64))  # noqa: E731
    s1 = b.op("Slice", [a, c64([2]), c64([7]), c64([1])], name="s1")
    s2 = b.op("Slice", [a, c64([5, 0]), c64([INT_MAX, INT_MAX]), c64([1, 2])], name="s2")
    s3 = b.op("Slice", [a, c64([-4]), c64([-1]), c64([1])], name="s3")
    y = b.op("Add", [b.op("Add", [b.conv(s1, 5, 4, name="p"), b.conv(s2, 5, 4, name="q")]), b.conv(s3, 3, 4, name="r")])
    summary = check_graph(b.model(image(), out(y)), fraction=0.5)
    analysis = summary["analysis"]
    g = analysis.groups[group_of(analysis, "s1.out", 0)]
    assert g.elements["a.out"] == [2] and g.consumers == ["p"]
    assert analysis.groups[group_of(analysis, "s3.out", 2)].elements["a.out"] == [8]

    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 10, name="a")])
    s = b.op("Slice", [a, b.const(np.array([0], dtype=np.int64)), b.const(np.array([10], dtype=np.int64)),
                       b.const(np.array([1], dtype=np.int64)), b.const(np.array([2], dtype=np.int64))], name="s")
    summary = check_graph(b.model(image(), out(b.conv(s, 5, 4, name="p"))))
    groups = summary["analysis"].groups
    assert {groups[g].reason for g in range(len(groups)) if "a.out" in groups[g].elements} == {
        "Slice 's' with step 2 on the channel axis"
    }


def test_pad_on_channel_axis_option_a_shortcut():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 4, name="a")])
    pads = b.const(np.array([0, 2, 0, 0, 0, 2, 0, 0], dtype=np.int64))
    padded = b.op("Pad", [a, pads, b.const(np.array(0.0, dtype=np.float32))], name="pad", mode="constant")
    s = b.op("Relu", [b.op("Add", [b.conv("x", 3, 8, name="b"), padded])])
    y = b.conv(s, 8, 4, name="c")
    summary = check_graph(b.model(image(), out(y)), fraction=0.5, seed=3)
    analysis = summary["analysis"]
    g = analysis.groups[group_of(analysis, "a.out", 1)]
    assert g.elements["pad.out"] == [3] and sorted(g.producers) == ["a", "b"]
    edge = analysis.groups[group_of(analysis, "pad.out", 7)]
    assert edge.prunable and edge.producers == ["b"] and "a.out" not in edge.elements
    assert summary["prunable"] == 8


def test_padded_channels_without_producer_are_unprunable():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 4, name="a")])
    pads = b.const(np.array([0, 1, 0, 0, 0, 3, 0, 0], dtype=np.int64))
    padded = b.op("Pad", [a, pads], name="pad", mode="constant")
    summary = check_graph(b.model(image(), out(b.conv(padded, 8, 3, name="c"))))
    analysis = summary["analysis"]
    assert summary["prunable"] == 4
    lone = analysis.groups[group_of(analysis, "pad.out", 0)]
    assert not lone.prunable and lone.reason == "no Conv/Gemm/MatMul produces these channels"


@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv_goes_with_its_channel(bias):
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    d = b.op("Relu", [b.conv(a, 8, 8, group=8, bias=bias, name="dw")])
    y = b.conv(d, 8, 4, name="b")
    summary = check_graph(b.model(image(), out(y)))
    analysis = summary["analysis"]
    g = analysis.groups[group_of(analysis, "a.out", 0)]
    assert g.depthwise == ["dw"] and g.producers == ["a"] and g.consumers == ["b"]
    # A depthwise Conv with bias maps a removed (zero) channel to its bias: it needs its own gate.
    assert site_tensors(analysis) == ({"a.out", "dw.out"} if bias else {"a.out"})


def test_unfolded_batchnorm_after_concat_gets_a_gate():
    b = Builder()
    cat = b.op("Concat", [b.conv("x", 3, 4, name="a"), b.conv("x", 3, 6, name="b")], axis=1)
    bn = b.op("BatchNormalization", [cat, b.const(b.rng.uniform(0.5, 1.5, 10).astype(np.float32)), b.rand(10),
                                     b.rand(10), b.const(b.rng.uniform(0.5, 2, 10).astype(np.float32))], name="bn")
    y = b.conv(b.op("Relu", [bn]), 10, 5, name="c")
    summary = check_graph(b.model(image(), out(y)))
    assert site_tensors(summary["analysis"]) == {"a.out", "b.out", "bn.out"}


def test_per_channel_and_scalar_constants():
    b = Builder(opset=14)
    a = b.conv("x", 3, 8, name="a")
    v = b.op("Mul", [a, b.rand(8, 1, 1)], name="mul")
    v = b.op("Add", [v, b.rand(1, 8, 1, 1)], name="add")
    v = b.op("Sub", [v, b.const(np.array(0.25, dtype=np.float32))], name="sub")
    v = b.op("Div", [v, b.const(b.rng.uniform(1, 2, (8, 1, 1)).astype(np.float32))], name="div")
    v = b.op("PRelu", [v, b.rand(8, 1, 1)], name="prelu")
    v = b.op("LeakyRelu", [v], alpha=0.1)
    v = b.op("Clip", [v, b.const(np.array(-1.0, dtype=np.float32)), b.const(np.array(6.0, dtype=np.float32))])
    v = b.op("HardSwish", [v])
    y = b.conv(v, 8, 4, name="b")
    summary = check_graph(b.model(image(), out(y)))
    analysis = summary["analysis"]
    assert summary["prunable"] == 8
    # Add of a per-channel constant then Sub of a scalar map 0 to non-zero: one gate after them.
    assert site_tensors(analysis) == {"a.out", "sub.out"}


@pytest.mark.parametrize("form", ["flatten", "reshape_const", "reshape_zero", "reshape_shape", "channels_last"])
def test_flatten_into_gemm_blocks_of_features(form):
    b = Builder(opset=13)
    a = b.op("Relu", [b.conv("x", 3, 4, name="a", stride=2)])  # (N, 4, 2, 2)
    if form == "flatten":
        flat = b.op("Flatten", [a], name="flat")
    elif form == "reshape_const":
        flat = b.op("Reshape", [a, b.const(np.array([-1, 16], dtype=np.int64))], name="flat")
    elif form == "reshape_zero":
        flat = b.op("Reshape", [a, b.const(np.array([0, -1], dtype=np.int64))], name="flat")
    elif form == "reshape_shape":
        batch = b.op("Gather", [b.op("Shape", [a]), b.const(np.array(0, dtype=np.int64))], axis=0)
        target = b.op("Concat", [b.op("Unsqueeze", [batch, b.const(np.array([0], dtype=np.int64))]),
                                 b.const(np.array([-1], dtype=np.int64))], axis=0)
        flat = b.op("Reshape", [a, target], name="flat")
    else:
        flat = b.op("Flatten", [b.op("Transpose", [a], perm=[0, 2, 3, 1])], name="flat")
    h = b.op("Relu", [b.gemm(flat, 16, 6, trans_b=0, name="fc1")])
    b.gemm(h, 6, 3, name="fc2")
    summary = check_graph(b.model(image(h=4, w=4), out("fc2.out", ["N", 3])))
    analysis = summary["analysis"]
    assert summary["prunable"] == 4 + 6
    g = analysis.groups[group_of(analysis, "a.out", 1)]
    assert g.elements["flat.out"] == ([1, 5, 9, 13] if form == "channels_last" else [4, 5, 6, 7])
    assert g.consumers == ["fc1"]


def test_reshape_with_fixed_batch_target_is_rewritten():
    """Dynamo exports fix the batch: Reshape(x, [2, 512]) must become [2, kept]."""
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    pooled = b.op("ReduceMean", [a], axes=[2, 3], keepdims=1)
    flat = b.op("Reshape", [pooled, b.const(np.array([2, 8], dtype=np.int64))], name="view")
    b.gemm(flat, 8, 3, name="fc")
    proto = make_model(b.nodes, [("x", F, [2, 3, 8, 8])], [("fc.out", F, [2, 3])], b.inits)
    summary = check_graph(proto)
    assert summary["prunable"] == 8


def test_matmul_with_constant_weight_and_bias_add():
    b = Builder()
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.conv("x", 3, 6, name="a")])])])
    h = b.op("MatMul", [flat, b.rand(6, 7)], name="mm1")
    h = b.op("Relu", [b.op("Add", [h, b.rand(7)], name="bias")])
    b.op("MatMul", [h, b.rand(7, 3)], name="mm2")
    summary = check_graph(b.model(image(), out("mm2.out", ["N", 3])))
    analysis = summary["analysis"]
    g = analysis.groups[group_of(analysis, "mm1.out", 0)]
    assert g.producers == ["mm1"] and g.consumers == ["mm2"]
    assert site_tensors(analysis) == {"a.out", "mm1.out", "bias.out"}


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_squeeze_excitation(kind):
    b = Builder()
    x = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    pooled = b.op("GlobalAveragePool", [x])
    if kind == "conv":
        s = b.op("Relu", [b.conv(pooled, 8, 2, k=1, name="fc1")])
        gate = b.op("Sigmoid", [b.conv(s, 2, 8, k=1, name="fc2")])
    else:
        s = b.op("Relu", [b.gemm(b.op("Flatten", [pooled]), 8, 2, name="fc1")])
        gate = b.op("HardSigmoid", [b.gemm(s, 2, 8, name="fc2")])
        gate = b.op("Reshape", [gate, b.const(np.array([-1, 8, 1, 1], dtype=np.int64))])
    y = b.conv(b.op("Mul", [x, gate]), 8, 4, name="b")
    summary = check_graph(b.model(image(), out(y)))
    analysis = summary["analysis"]
    g = analysis.groups[group_of(analysis, "a.out", 0)]
    assert sorted(g.producers) == ["a", "fc2"] and sorted(g.consumers) == ["b", "fc1"]
    squeeze = analysis.groups[group_of(analysis, "fc1.out", 0)]
    assert squeeze.producers == ["fc1"] and squeeze.consumers == ["fc2"]
    assert summary["prunable"] == 8 + 2
    assert site_tensors(analysis) == {"a.out", "fc1.out", "fc2.out"}


def test_per_channel_op_zoo():
    b = Builder(opset=13)
    x = b.conv("x", 3, 6, name="a")
    v = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    v = b.op("Resize", [v, "", b.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    v = b.op("Mul", [v, b.op("Sigmoid", [v])])  # SiLU
    v = b.op("Mul", [v, b.op("HardSigmoid", [v])])
    v = b.op("Transpose", [b.op("Tanh", [v])], perm=[0, 1, 3, 2])
    v = b.op("AveragePool", [b.op("Identity", [v])], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    v = b.op("Cast", [b.op("Dropout", [v])], to=F)
    v = b.op("Resize", [v, "", "", b.const(np.array([2, 6, 4, 4], dtype=np.int64))], name="resize_sizes", mode="linear")
    m = b.op("ReduceMean", [v], axes=[2, 3], keepdims=0)  # (N, 6)
    gmax = b.op("GlobalMaxPool", [v])
    u = b.op("Unsqueeze", [m, b.const(np.array([2, 3], dtype=np.int64))])
    v = b.op("Add", [b.op("Mul", [v, u]), gmax])
    y = b.conv(v, 6, 3, name="b")
    summary = check_graph(b.model([("x", F, [2, 3, 8, 8])], out(y)))  # static batch: Resize sizes hold it
    assert summary["prunable"] == 6
    assert site_tensors(summary["analysis"]) == {"a.out"}


def test_instance_normalization_is_per_channel_and_gated():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    v = b.op("InstanceNormalization", [a, b.rand(8), b.rand(8)], name="norm")
    summary = check_graph(b.model(image(), out(b.conv(b.op("Relu", [v]), 8, 3, name="b"))))
    assert site_tensors(summary["analysis"]) == {"a.out", "norm.out"}


def test_gemm_classifier_hidden_features():
    b = Builder()
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.conv("x", 3, 8, name="a")])])])
    h = b.op("Relu", [b.gemm(flat, 8, 16, name="fc1")])
    h = b.op("Relu", [b.gemm(b.op("Dropout", [h]), 16, 12, trans_b=0, name="fc2")])
    b.gemm(h, 12, 5, name="fc3")
    summary = check_graph(b.model(image(), out("fc3.out", ["N", 5])))
    assert summary["prunable"] == 8 + 16 + 12


def test_shared_initializers_are_sliced_per_use():
    """A per-channel constant used on two unrelated tensors, and a weight tied between two Convs:
    each use gets its own sliced copy when they differ, and the cost counts exactly those."""
    b = Builder()
    scale = b.rand(8, 1, 1)
    w = b.rand(8, 8, 3, 3, scale=0.1)
    p = b.op("Mul", [b.op("Relu", [b.conv("x", 3, 8, name="a")]), scale], name="m1")
    q = b.op("Mul", [b.op("Relu", [b.conv("x", 3, 8, name="b")]), scale], name="m2")
    p = b.op("Conv", [p, w], name="tied1", kernel_shape=[3, 3], pads=[1] * 4)
    q = b.op("Conv", [q, w], name="tied2", kernel_shape=[3, 3], pads=[1] * 4)
    y = b.conv(b.op("Concat", [p, q], axis=1), 16, 4, name="c")
    proto = b.model(image(), out(y))
    for seed in range(3):
        summary = check_graph(proto, fraction=0.3, seed=seed)
    assert summary["prunable"] == 32
    assert len(summary["analysis"].plan.shared_inits) == 2


@pytest.mark.parametrize("opset", [9, 18])
def test_pad_attribute_and_axes_forms(opset):
    b = Builder(opset=opset)
    a = b.op("Relu", [b.conv("x", 3, 4, name="a")])
    if opset == 9:
        padded = b.op("Pad", [a], name="pad", mode="constant", pads=[0, 2, 1, 0, 0, 2, 1, 0])
    else:
        pads = b.const(np.array([2, 1, 2, 1], dtype=np.int64))
        padded = b.op("Pad", [a, pads, "", b.const(np.array([1, 2], dtype=np.int64))], name="pad", mode="constant")
    s = b.op("Add", [b.conv("x", 3, 8, name="b"), b.op("Slice", [padded, b.const(np.array([1], dtype=np.int64)),
                                                                    b.const(np.array([9], dtype=np.int64)),
                                                                    b.const(np.array([2], dtype=np.int64))])
                     if opset != 9 else b.op("Slice", [padded], starts=[1], ends=[9], axes=[2])])
    summary = check_graph(b.model(image(), out(b.conv(s, 8, 2, name="c"))), fraction=0.5)
    assert summary["prunable"] == 8


def test_upsample_and_resize_that_scales_channels():
    b = Builder(opset=9)
    a = b.op("Relu", [b.conv("x", 3, 4, name="a")])
    u = b.op("Upsample", [a, b.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    summary = check_graph(b.model(image(), out(b.conv(u, 4, 2, name="c"))))
    assert summary["prunable"] == 4

    b = Builder(opset=13)
    a = b.op("Relu", [b.conv("x", 3, 4, name="a")])
    u = b.op("Resize", [a, "", b.const(np.array([1, 2, 1, 1], dtype=np.float32))], name="up", mode="nearest")
    analysis = analysed(b.model(image(), out(b.conv(u, 8, 2, name="c"))))
    assert reasons_of(analysis, "a.out") == {"Resize 'up' scales the channel axis"}


# ---------------------------------------------------------------------------------------------
# Unprunable, with a reason


def reasons_of(analysis: ChannelAnalysis, tensor_name: str) -> set[str]:
    return {g.reason for g in analysis.groups if tensor_name in g.elements}


def analysed(proto: onnx.ModelProto) -> ChannelAnalysis:
    return check_graph(proto)["analysis"]


def test_unprunable_graph_output():
    b = Builder()
    a = b.conv("x", 3, 8, name="a")
    y = b.conv(b.op("Relu", [a]), 8, 4, name="b")
    analysis = analysed(b.model(image(), out(a) + out(y)))
    assert reasons_of(analysis, "a.out") == {"reaches graph output 'a.out'"}
    assert analysis.removable() == []


@pytest.mark.parametrize("op,attrs", [("LRN", {"size": 3}), ("Softmax", {"axis": 1}), ("LpNormalization", {"axis": 1})])
def test_unprunable_unknown_or_cross_channel_op(op, attrs):
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    v = b.op(op, [a], name="norm", **attrs)
    reason = f"unsupported op {op} ('norm')"
    h = b.op("Relu", [b.conv(v, 8, 6, name="b")])
    analysis = analysed(b.model(image(), out(b.conv(h, 6, 2, name="c"))))
    assert reasons_of(analysis, "a.out") == {reason}
    assert len(analysis.removable()) == 6  # b's outputs are still prunable


def test_unprunable_reshape_that_splits_channels():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    v = b.op("Reshape", [a, b.const(np.array([-1, 2, 4, 8, 8], dtype=np.int64))], name="view")
    v = b.op("Reshape", [b.op("Transpose", [v], perm=[0, 2, 1, 3, 4]), b.const(np.array([-1, 8, 8, 8], dtype=np.int64))])
    analysis = analysed(b.model(image(), out(b.conv(v, 8, 4, name="b"))))
    assert reasons_of(analysis, "a.out") == {
        "Reshape 'view' (1, 8, 8, 8) -> (1, 2, 4, 8, 8) splits the channel axis or merges it with the batch"
    }


def test_unprunable_grouped_conv():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    g = b.op("Relu", [b.conv(a, 8, 8, group=2, name="g")])
    analysis = analysed(b.model(image(), out(b.conv(g, 8, 4, name="b"))))
    assert reasons_of(analysis, "a.out") == reasons_of(analysis, "g.out") == {"grouped Conv 'g' (group=2)"}
    assert (analysis.layer_channels()["g"][0] == -1).all()


def test_unprunable_matmul_of_two_activations():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    flat = b.op("Reshape", [a, b.const(np.array([0, 8, -1], dtype=np.int64))])  # (N, 8, 64)
    mm = b.op("MatMul", [flat, b.op("Transpose", [flat], perm=[0, 2, 1])], name="mm")  # (N, 8, 8)
    y = b.op("MatMul", [mm, b.rand(8, 3)], name="proj")
    analysis = analysed(b.model(image(), out(y, ["N", 8, 3])))
    assert "MatMul 'mm' between two activations" in reasons_of(analysis, "a.out")
    assert analysis.removable() == []


def test_unprunable_channel_count_in_shape_computation():
    b = Builder(opset=13)
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    dims = b.op("Slice", [b.op("Shape", [a]), b.const(np.array([0], dtype=np.int64)), b.const(np.array([2], dtype=np.int64))])
    target = b.op("Concat", [dims, b.const(np.array([-1], dtype=np.int64))], axis=0)
    v = b.op("Reshape", [a, target], name="view")  # (N, C, H*W), C read at run time
    v = b.op("Unsqueeze", [v, b.const(np.array([3], dtype=np.int64))])
    analysis = analysed(b.model(image(), out(b.conv(v, 8, 4, k=1, name="b"))))
    assert f"channel count of '{a}' is read by a shape computation (Reshape 'view')" in reasons_of(analysis, a)
    assert all(not g.prunable for g in analysis.groups if a in g.elements)


def test_unprunable_reduction_over_channels_and_unresolved_broadcast():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    att = b.op("Sigmoid", [b.op("ReduceMean", [a], axes=[1], keepdims=1, name="rm")])  # spatial attention
    v = b.op("Mul", [a, att])
    t = b.op("Transpose", [b.conv(v, 8, 8, name="b")], perm=[0, 2, 1, 3])  # channels on axis 2
    bad = b.op("Add", [b.conv(v, 8, 8, name="c"), t], name="mix")
    analysis = analysed(b.model(image(), out(b.conv(bad, 8, 2, name="d"))))
    assert reasons_of(analysis, "a.out") == {"ReduceMean 'rm' reduces over the channel axis"}
    assert reasons_of(analysis, "b.out") == {"Add 'mix': cannot resolve the broadcast of channel axes"}


def test_unprunable_div_by_activation_and_weight_that_is_a_graph_input():
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")])
    v = b.op("Div", [a, b.op("Sigmoid", [a])], name="div")
    y = b.conv(v, 8, 4, name="b")
    a2 = b.op("Relu", [b.conv("x", 3, 6, name="a2")])
    y2 = b.op("Conv", [a2, "w"], name="b2", kernel_shape=[1, 1])
    proto = make_model(b.nodes, image() + [("w", F, [4, 6, 1, 1])], out(y) + out(y2), b.inits)
    analysis = analysed(proto)
    assert reasons_of(analysis, "a.out") == {"Div 'div' of an activation by an activation (0/0 is not 0)"}
    assert reasons_of(analysis, "a2.out") == {"Conv 'b2' weight is not a constant"}


# ---------------------------------------------------------------------------------------------
# Contract details


def small_resnet() -> onnx.ModelProto:
    """Stem, a residual block, a downsampling block with an option-A shortcut (strided Slice +
    channel Pad), global pool, Flatten and two Gemm: most coupling rules in one small graph."""
    b = Builder(seed=5)
    c64 = lambda v: b.const(np.array(v, dtype=np.int64))  # noqa: E731
    x0 = b.op("Relu", [b.conv("x", 3, 8, name="stem")])
    h = b.op("Relu", [b.conv(x0, 8, 8, name="b1.conv1")])
    x1 = b.op("Relu", [b.op("Add", [b.conv(h, 8, 8, name="b1.conv2"), x0])])
    h = b.op("Relu", [b.conv(x1, 8, 16, stride=2, name="b2.conv1")])
    short = b.op("Slice", [x1, c64([0, 0]), c64([INT_MAX, INT_MAX]), c64([2, 3]), c64([2, 2])])
    short = b.op("Pad", [short, c64([0, 4, 0, 0, 0, 4, 0, 0])], mode="constant")
    x2 = b.op("Relu", [b.op("Add", [b.conv(h, 16, 16, name="b2.conv2"), short])])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [x2])])
    b.gemm(b.op("Relu", [b.gemm(flat, 16, 12, name="fc1")]), 12, 5, name="fc2")
    return b.model(image(), out("fc2.out", ["N", 5]))


@pytest.fixture(scope="module")
def small():
    return normalised(small_resnet())


def test_small_resnet(small):
    summary = check_exact(*small, fraction=0.5)
    # stage-1 stream (also 8 of the 16 stage-2 channels), both inner convs, the 8 padded stage-2
    # channels, the hidden features
    assert summary["prunable"] == 8 + 8 + 16 + 8 + 12


def test_removing_nothing_is_the_identity(small):
    model, shapes = small
    analysis = analyse_channels(model, shapes)
    copy = ir.serde.deserialize_model(ir.to_proto(model))
    before = ir.to_proto(copy).SerializeToString()
    result = RemoveChannelsPass(analysis, [])(copy)
    assert not result.modified and ir.to_proto(copy).SerializeToString() == before
    assert ir.to_proto(remove_channels(model, analysis, [])).SerializeToString() == before


def test_the_input_model_is_never_modified(small):
    model, shapes = small
    before = ir.to_proto(model).SerializeToString()
    analysis = analyse_channels(model, shapes)
    chosen = choose(analysis, 0.5, 1)
    gated_model(model, analysis, {g: 0.0 for g in chosen})
    remove_channels(model, analysis, chosen)
    analysis.cost(analysis.removed_mask(chosen))
    assert ir.to_proto(model).SerializeToString() == before


def test_masks_as_mapping_and_partial_values(small):
    model, shapes = small
    analysis = analyse_channels(model, shapes)
    chosen = choose(analysis, 0.3, 2)
    as_map = ir.to_proto(gated_model(model, analysis, {g: 0.0 for g in chosen}))
    array = np.ones(len(analysis.groups))
    array[chosen] = 0
    feeds = random_feeds(as_map)
    assert np.array_equal(run(as_map, feeds)[0], run(ir.to_proto(gated_model(model, analysis, array)), feeds)[0])
    half = ir.to_proto(gated_model(model, analysis, np.full(len(analysis.groups), 0.5)))
    assert not np.allclose(run(half, feeds)[0], run(ir.to_proto(model), feeds)[0])


def test_refused_removals(small):
    model, shapes = small
    analysis = analyse_channels(model, shapes)
    unprunable = next(g.index for g in analysis.groups if not g.prunable)
    with pytest.raises(ValueError, match="not prunable"):
        remove_channels(model, analysis, [unprunable])
    with pytest.raises(ValueError, match="not prunable"):
        analysis.cost(analysis.plan.prunable | (np.arange(len(analysis.groups)) == unprunable))
    first_conv = next(iter(analysis.layer_channels().values()))[0]
    everything = sorted(set(first_conv.tolist()))
    assert analysis.emptied(analysis.removed_mask(everything))
    with pytest.raises(ValueError, match="leaves no channel"):
        remove_channels(model, analysis, everything)


def test_cost_is_fast(small):
    model, shapes = small
    analysis = analyse_channels(model, shapes)
    rng = np.random.default_rng(0)
    masks = [analysis.removed_mask(choose(analysis, f, int(rng.integers(1000)))) for f in (0.1, 0.3, 0.5)]
    start = time.perf_counter()
    for _ in range(100):
        for mask in masks:
            analysis.cost(mask)
    per_call = (time.perf_counter() - start) / 300
    assert per_call < 5e-3, f"{per_call * 1e3:.2f} ms per cost() call"


def test_prepare_gives_the_same_analysis(shared_dir):
    path = shared_model(shared_dir, "resnet20_cifar10.onnx")
    prepared = prepare(path)
    a = analyse_channels(prepared.model, prepared.shapes)
    b = analyse_channels(*normalised(path))
    assert [g.elements for g in a.groups] == [g.elements for g in b.groups]
    assert [s.tensor for s in a.sites] == [s.tensor for s in b.sites]


# ---------------------------------------------------------------------------------------------
# Real models: ../shared and torchvision (random weights, randomised BatchNorm statistics)

@pytest.mark.parametrize("name", ["resnet20_cifar10.onnx", "resnet56_cifar10.onnx", "efficientnet_lite0_imagenet.onnx"])
def test_shared_models(shared_dir, name, record_property):
    model, shapes = normalised(shared_model(shared_dir, name))
    summary = check_exact(model, shapes, check_ones=name.startswith("resnet20"))
    analysis = summary.pop("analysis")
    for key, value in summary.items():
        record_property(key, value)
    n_compute = sum(n.op_type in ("Conv", "Gemm") for n in model.graph)
    if name.startswith("resnet"):
        assert summary["prunable"] == {"resnet20_cifar10.onnx": 400, "resnet56_cifar10.onnx": 1072}[name]
        assert len(analysis.sites) == n_compute - 1  # every Conv, not the logits Gemm
    else:
        assert summary["prunable"] == 11024 and len(analysis.sites) == n_compute - 1


def test_resnet20_option_a_shortcut_links_stages(shared_dir):
    """Stage-1 channel j is added into stage-2 channel j + 8 and stage-3 channel j + 24."""
    model, shapes = normalised(shared_model(shared_dir, "resnet20_cifar10.onnx"))
    analysis = analyse_channels(model, shapes)
    g = analysis.groups[group_of(analysis, "/layer1/layer1.2/Relu_1_output_0", 5)]
    assert g.prunable
    assert g.elements["/layer2/layer2.0/shortcut/Pad_output_0"] == [13]
    assert g.elements["/layer3/layer3.0/shortcut/Pad_output_0"] == [29]
    assert "/conv1/Conv" in g.producers and "/layer3/layer3.2/conv2/Conv" in g.producers


# (arch, exporter, input size): the default set covers every coupling kind and both exporters.
TORCHVISION = [
    ("resnet18", "ts13", 32),
    ("resnet18", "dynamo18", 32),
    ("densenet121", "ts17", 32),
    ("googlenet", "dynamo18", 64),
    ("mobilenet_v2", "ts13", 32),
    ("efficientnet_b0", "ts17", 32),
    ("mobilenet_v3_small", "ts13", 32),
    ("mobilenet_v3_small", "dynamo18", 32),
    ("vgg11_bn", "ts13", 32),
    ("vgg11_bn", "dynamo18", 32),
]
SLOW = [
    ("densenet121", "dynamo18", 32),
    ("googlenet", "ts13", 64),
    ("efficientnet_b0", "dynamo18", 32),
    ("mobilenet_v2", "ts17", 64),
    ("mnasnet0_5", "ts17", 64),
    ("squeezenet1_0", "dynamo18", 64),
    ("regnet_x_400mf", "ts17", 64),
    ("shufflenet_v2_x0_5", "ts13", 64),
]


def export_at(arch: str, exporter: str, size: int, path: Path) -> Path:
    """Like test_torchvision_exact.export (same random weights), at input size ``size``."""
    torch = pytest.importorskip("torch")
    from test_torchvision_exact import _build

    model = _build(arch)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter.startswith("ts"):
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=int(exporter[2:]), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        else:
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=int(exporter[6:]), input_names=["input"],
                                        output_names=["logits"], verbose=False)
            program.save(str(path))
    return path


def _cases():
    cases = [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in TORCHVISION]
    return cases + [pytest.param(*c, id=f"{c[0]}-{c[1]}", marks=pytest.mark.slow) for c in SLOW]


@pytest.mark.parametrize("arch,exporter,size", _cases())
def test_torchvision(tmp_path, arch, exporter, size, record_property):
    path = export_at(arch, exporter, size, tmp_path / f"{arch}-{exporter}.onnx")
    model, shapes = normalised(path)
    summary = check_exact(model, shapes, check_ones=exporter == "ts13")
    analysis = summary.pop("analysis")
    for key, value in summary.items():
        record_property(key, value)
    assert summary["prunable"] > 0
    ops = [n.op_type for n in model.graph]
    producers = {v.name: n.op_type for n in model.graph for v in n.outputs}
    extra = [producers[s.tensor] for s in analysis.sites if producers[s.tensor] not in ("Conv", "Gemm", "MatMul")]
    if arch == "densenet121":  # every BatchNormalization left after a Concat needs a gate of its own
        assert set(extra) == {"BatchNormalization"} and len(extra) == ops.count("BatchNormalization")
    else:  # activations, SE gates (Sigmoid/HardSigmoid), pooling, Pad: no gate beyond the producers'
        assert extra == []
    if arch in ("mobilenet_v2", "efficientnet_b0", "mobilenet_v3_small"):  # depthwise Conv with bias: gated
        assert len(analysis.sites) == ops.count("Conv") + (arch == "mobilenet_v3_small")  # + the hidden Gemm


def test_torchvision_mobilenet_v2_real_weights(shared_dir, tmp_path):
    """The shared ImageNet MobileNetV2 weights, exported by the dynamo exporter."""
    weights = shared_model(shared_dir, "mobilenet_v2_imagenet.pth")
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net.eval(), (x,), dynamo=True, opset_version=18, input_names=["input"], verbose=False)
    program.save(str(tmp_path / "mobilenet_v2.onnx"))
    model, shapes = normalised(tmp_path / "mobilenet_v2.onnx")
    summary = check_exact(model, shapes, check_ones=False)
    assert summary["prunable"] == 9128


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    path = export_at("resnet18", "ts13", 32, tmp_path_factory.mktemp("resnet18") / "resnet18.onnx")
    return normalised(path)


def test_resnet18_groups_follow_the_residual_streams(resnet18):
    model, shapes = resnet18
    analysis = analyse_channels(model, shapes)
    widths = {1: 64, 2: 128, 3: 256, 4: 512}
    for stage, width in widths.items():
        stream = f"/layer{stage}/layer{stage}.1/relu_1/Relu_output_0"  # the stage's output
        groups = {group_of(analysis, stream, c) for c in range(width)}
        assert len(groups) == width  # one group per residual-stream channel
        producers = {f"/layer{stage}/layer{stage}.{blk}/conv2/Conv" for blk in (0, 1)}
        producers |= {"/conv1/Conv"} if stage == 1 else {f"/layer{stage}/layer{stage}.0/downsample/downsample.0/Conv"}
        consumers = {f"/layer{stage}/layer{stage}.{blk}/conv1/Conv" for blk in (0, 1)} - (
            set() if stage == 1 else {f"/layer{stage}/layer{stage}.0/conv1/Conv"}
        )
        consumers |= {"/fc/Gemm"} if stage == 4 else {
            f"/layer{stage + 1}/layer{stage + 1}.0/conv1/Conv", f"/layer{stage + 1}/layer{stage + 1}.0/downsample/downsample.0/Conv"
        }
        for g in groups:
            group = analysis.groups[g]
            assert group.prunable and set(group.producers) == producers and set(group.consumers) == consumers, (stage, group)
    inner = sum(widths.values()) * 2  # each block's first conv
    assert len(analysis.removable()) == sum(widths.values()) + inner == 2880
    assert all(not g.prunable for g in analysis.groups if "input" in g.elements or "logits" in g.elements)
