"""Exactness of the basis/scaling split against onnxruntime, and data-free pruning, on small
models built with onnx.helper."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import (
    assert_same_outputs,
    bf16_to_float32,
    cnn_model,
    conv_model,
    initializer_params,
    make_model,
    max_rel_error,
    random_feeds,
    run,
    tensor,
)
from onnx import TensorProto, helper, numpy_helper

from onnx_basisprune import BasisPruneError, decompose, prepare, prune

SPATIAL = (20, 21)


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _decompose_exact(model: onnx.ModelProto, tol: float = 1e-4, **kwargs) -> onnx.ModelProto:
    result = decompose(model, **kwargs)
    assert [layer.action for layer in result.layers] == ["decomposed"] * len(result.layers), result.layers
    out = result.to_proto()
    onnx.checker.check_model(out, full_check=True)
    return out


# ---------------------------------------------------------------------------------------------
# Conv geometry


CONV_CASES = {
    "1d-k3": dict(kernel=(3,), spatial=(64,)),
    "1d-k5-stride2-pads": dict(kernel=(5,), spatial=(64,), strides=[2], pads=[1, 3]),
    "2d-3x3": dict(kernel=(3, 3), spatial=SPATIAL),
    "2d-1x1": dict(kernel=(1, 1), spatial=(32, 32)),
    "2d-5x1": dict(kernel=(5, 1), spatial=SPATIAL),
    "2d-strides": dict(kernel=(3, 3), spatial=SPATIAL, strides=[2, 3]),
    "2d-dilations": dict(kernel=(3, 3), spatial=SPATIAL, dilations=[2, 1]),
    "2d-asymmetric-pads": dict(kernel=(3, 3), spatial=SPATIAL, pads=[0, 1, 2, 1]),
    "2d-same-upper": dict(kernel=(3, 3), spatial=SPATIAL, auto_pad="SAME_UPPER", strides=[2, 2]),
    "2d-same-lower": dict(kernel=(4, 4), spatial=SPATIAL, auto_pad="SAME_LOWER", strides=[2, 2]),
    "2d-valid": dict(kernel=(3, 3), spatial=SPATIAL, auto_pad="VALID"),
    "2d-no-bias": dict(kernel=(3, 3), spatial=SPATIAL, bias=False),
    "2d-groups2": dict(kernel=(3, 3), spatial=SPATIAL, groups=2),
    "2d-groups4-strided-no-bias": dict(kernel=(3, 3), spatial=SPATIAL, groups=4, strides=[2, 2], pads=[1, 1, 1, 1], bias=False),
    "3d-3x3x3": dict(in_ch=8, out_ch=16, kernel=(3, 3, 3), spatial=(8, 9, 10)),
    "3d-strides-dilations": dict(in_ch=8, out_ch=16, kernel=(3, 1, 3), spatial=(9, 9, 10), strides=[2, 1, 1], dilations=[1, 1, 2], pads=[1, 0, 0, 0, 0, 2]),
}


@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_conv_split_is_exact(case):
    kwargs = dict(in_ch=16, out_ch=24) | CONV_CASES[case]
    model = conv_model(**kwargs)
    out = _decompose_exact(model)
    nodes = _nodes(out)
    assert set(nodes) == {"conv.basis", "conv.scaling"}
    basis, scaling = nodes["conv.basis"], nodes["conv.scaling"]
    assert basis.op_type == scaling.op_type == "Conv"
    assert list(basis.input)[0] == "x" and list(scaling.output) == ["y"]
    assert len(basis.input) == 2, "the basis Conv has no bias"
    assert len(scaling.input) == (3 if kwargs.get("bias", True) else 2)
    # the basis Conv keeps every geometry attribute; the scaling Conv is 1x1 with the same groups
    original = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    got = {a.name: helper.get_attribute_value(a) for a in basis.attribute}
    assert got == original
    scaling_attrs = {a.name: helper.get_attribute_value(a) for a in scaling.attribute}
    assert scaling_attrs.get("group", 1) == kwargs.get("groups", 1)
    assert scaling_attrs["kernel_shape"] == [1] * len(kwargs["kernel"])
    assert not {"strides", "pads", "dilations", "auto_pad"} & {k for k, v in scaling_attrs.items() if v not in ([1] * 3, [0] * 6, b"NOTSET")}
    w_basis = _init(out, basis.input[1])
    groups = kwargs.get("groups", 1)
    full_rank = min(kwargs["out_ch"] // groups, kwargs["in_ch"] // groups * int(np.prod(kwargs["kernel"])))
    assert list(w_basis.dims) == [groups * full_rank, kwargs["in_ch"] // groups, *kwargs["kernel"]]
    assert list(_init(out, scaling.input[1]).dims) == [kwargs["out_ch"], full_rank, *[1] * len(kwargs["kernel"])]
    # basis filters are orthonormal per group
    vt = numpy_helper.to_array(w_basis).astype(np.float64).reshape(groups, full_rank, -1)
    for g in range(groups):
        np.testing.assert_allclose(vt[g] @ vt[g].T, np.eye(full_rank), atol=1e-5)
    assert_same_outputs(model, out)


def test_conv_whose_rank_bound_is_the_fan_in():
    # 1x1 Conv 8 -> 64: rank bound is C_in = 8, the basis Conv has 8 filters
    model = conv_model(8, 64, (1, 1), (32, 32))
    out = _decompose_exact(model)
    assert list(_init(out, "conv.basis.weight").dims) == [8, 8, 1, 1]
    assert_same_outputs(model, out)


def test_depthwise_conv_is_skipped_with_a_reason():
    model = conv_model(16, 16, (3, 3), SPATIAL, groups=16)
    with pytest.raises(BasisPruneError, match="depthwise"):
        decompose(model)
    # next to a splittable layer it is reported as skipped and left alone
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "dw.w"], ["h"], name="dw", group=16, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h", "pw.w"], ["y"], name="pw", kernel_shape=[3, 3]),
    ]
    inits = [tensor("dw.w", rng.standard_normal((16, 1, 3, 3)).astype(np.float32)),
             tensor("pw.w", rng.standard_normal((24, 16, 3, 3)).astype(np.float32))]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["N", 16, *SPATIAL])], [("y", TensorProto.FLOAT, ["N", 24, None, None])], inits)
    result = decompose(model)
    actions = {layer.name: (layer.action, layer.reason) for layer in result.layers}
    assert actions["dw"][0] == "skipped" and "depthwise" in actions["dw"][1]
    assert actions["pw"][0] == "decomposed"
    out = result.to_proto()
    assert _nodes(out)["dw"].input[1] == "dw.w"
    assert_same_outputs(model, out)


# ---------------------------------------------------------------------------------------------
# Gemm and MatMul

K, N = 256, 200


def _gemm_model(trans_b: int, alpha: float, beta: float, with_c: bool, dtype=np.float32, c_shape=(N,)) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
    inits, inputs = [tensor("W", w)], ["x", "W"]
    if with_c:
        inits.append(tensor("C", rng.standard_normal(c_shape).astype(dtype)))
        inputs.append("C")
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], [("x", et, ["N", K])], [("y", et, ["N", N])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.25)])
@pytest.mark.parametrize("with_c", [True, False], ids=["C", "noC"])
def test_gemm_split_is_exact(trans_b, alpha, beta, with_c):
    model = _gemm_model(trans_b, alpha, beta, with_c)
    out = _decompose_exact(model)
    nodes = _nodes(out)
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"]
    assert len(nodes["fc.basis"].input) == 2
    assert len(nodes["fc.scaling"].input) == (3 if with_c else 2)
    assert_same_outputs(model, out)


def test_gemm_with_a_row_bias():
    model = _gemm_model(1, 0.5, 2.0, True, c_shape=(1, N))
    assert_same_outputs(model, _decompose_exact(model))


@pytest.mark.parametrize("lead", [["N"], ["N", 7], ["N", 3, 5]], ids=["2d", "3d", "4d"])
def test_matmul_with_a_constant_matrix_is_exact(lead):
    rng = np.random.default_rng(2)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [("x", TensorProto.FLOAT, [*lead, K])], [("y", TensorProto.FLOAT, [*lead, N])],
                       [tensor("W", rng.standard_normal((K, N)).astype(np.float32))])
    out = _decompose_exact(model)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]
    assert list(_init(out, "mm.basis.weight").dims) == [K, N]
    assert list(_init(out, "mm.scaling.weight").dims) == [N, N]
    for batch in (1, 3):
        assert_same_outputs(model, out, batch=batch)


def test_matmul_with_symbolic_rows_needs_input_shapes_for_macs():
    rng = np.random.default_rng(2)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [("x", TensorProto.FLOAT, ["N", "T", K])], [("y", TensorProto.FLOAT, ["N", "T", N])],
                       [tensor("W", rng.standard_normal((K, N)).astype(np.float32))])
    with pytest.raises(BasisPruneError, match="symbolic dims"):
        prune(model, target_macs=0.5)
    assert decompose(model).original.macs is None  # the split itself needs no size
    out = _decompose_exact(model, input_shapes={"x": (1, 6, K)})
    assert_same_outputs(model, out, feeds={"x": np.random.default_rng(0).standard_normal((2, 9, K)).astype(np.float32)})


def test_matmul_of_two_activations_is_not_a_layer():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h", "ht"], ["y"], name="attn"),
    ]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["N", 16, K])], [("y", TensorProto.FLOAT, ["N", 16, 16])],
                       [tensor("W", rng.standard_normal((K, N)).astype(np.float32))])
    result = decompose(model)
    assert [layer.name for layer in result.layers] == ["mm"]
    assert_same_outputs(model, result.to_proto())


# ---------------------------------------------------------------------------------------------
# Dtypes


def test_float16_conv_and_gemm_keep_their_dtype():
    model = conv_model(16, 24, (3, 3), SPATIAL, dtype=TensorProto.FLOAT16)
    out = _decompose_exact(model)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    feeds = random_feeds(model)
    assert feeds["x"].dtype == np.float16
    (got,) = run(out, feeds)
    assert got.dtype == np.float16
    assert_same_outputs(model, out, feeds=feeds, tol=1e-2)

    gemm = _gemm_model(1, 0.5, 2.0, True, dtype=np.float16)
    out = _decompose_exact(gemm)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    assert_same_outputs(gemm, out, tol=1e-2)


def test_float16_conv_matches_a_float32_reference():
    """fp16 model vs the same weights in float32: the split adds no more than fp16 rounding."""
    model16 = conv_model(16, 24, (3, 3), SPATIAL, dtype=TensorProto.FLOAT16)
    model32 = conv_model(16, 24, (3, 3), SPATIAL, dtype=TensorProto.FLOAT)
    feeds = random_feeds(model32)
    (ref,) = run(model32, feeds)
    (got,) = run(_decompose_exact(model16), {"x": feeds["x"].astype(np.float16)})
    assert max_rel_error(ref, got) < 1e-2


def test_float64_gemm_is_exact_to_double_precision():
    model = _gemm_model(0, 0.5, 2.0, True, dtype=np.float64)
    out = _decompose_exact(model)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.DOUBLE}
    assert_same_outputs(model, out, tol=1e-10)


def _bf16_as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every bfloat16 initializer and graph type turned into float32."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.BFLOAT16:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(bf16_to_float32(t), t.name))
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return m


def test_bfloat16_conv_keeps_its_dtype_and_recomposes():
    model = conv_model(16, 24, (3, 3), SPATIAL, dtype=TensorProto.BFLOAT16, opset=22)
    out = _decompose_exact(model)  # checker passes (full_check)
    assert out.opset_import[0].version == 22
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.BFLOAT16}
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    # numpy recomposition: scaling (C_out, r) @ basis (r, fan_in) is the original weight up to bf16 rounding
    w = bf16_to_float32(_init(model, "W")).reshape(24, -1).astype(np.float64)
    basis = bf16_to_float32(_init(out, "conv.basis.weight")).reshape(24, -1).astype(np.float64)
    scaling = bf16_to_float32(_init(out, "conv.scaling.weight")).reshape(24, 24).astype(np.float64)
    assert max_rel_error(w, scaling @ basis) < 2e-2
    np.testing.assert_array_equal(bf16_to_float32(_init(out, "B")), bf16_to_float32(_init(model, "B")))
    # run the graph on onnxruntime if it can, else the same graph with the bf16 values as float32
    try:
        from conftest import session

        session(out)
    except Exception:
        ref32, out32 = _bf16_as_float32(model), _bf16_as_float32(out)
        assert_same_outputs(ref32, out32, tol=2e-2)
    else:  # pragma: no cover - onnxruntime without bf16 Conv on CPU at the time of writing
        pytest.fail("onnxruntime runs bf16 Conv now: compare outputs directly")


# ---------------------------------------------------------------------------------------------
# Metadata, names, batch, the caller's model


def test_metadata_on_the_new_nodes():
    model = conv_model(16, 24, (3, 3), SPATIAL, groups=2)
    out = _decompose_exact(model)
    nodes = _nodes(out)
    basis, scaling = _meta(nodes["conv.basis"]), _meta(nodes["conv.scaling"])
    assert basis["basisprune.role"] == "basis" and scaling["basisprune.role"] == "scaling"
    assert basis["basisprune.layer"] == scaling["basisprune.layer"] == "conv"
    assert basis["basisprune.full_rank"] == scaling["basisprune.full_rank"] == "12"
    assert basis["basisprune.kept_rank"] == scaling["basisprune.kept_rank"] == "12"
    s = np.array(json.loads(scaling["basisprune.singular_values"]))
    w = numpy_helper.to_array(_init(model, "W")).astype(np.float64).reshape(2, 12, -1)
    expected = np.stack([np.linalg.svd(w[g], compute_uv=False) for g in range(2)])
    np.testing.assert_allclose(s, expected, atol=1e-7)
    # survives a save/load round trip
    again = onnx.load_from_string(out.SerializeToString())
    assert _meta(_nodes(again)["conv.scaling"]) == scaling


def test_names_opset_and_dynamic_batch_are_preserved():
    model = cnn_model()
    out = decompose(model).to_proto()
    assert [(o.domain, o.version) for o in out.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]
    assert [i.name for i in out.graph.input] == ["input"]
    assert [o.name for o in out.graph.output] == ["logits"]
    dim0 = out.graph.input[0].type.tensor_type.shape.dim[0]
    assert not dim0.HasField("dim_value"), "batch dimension must stay dynamic"
    for batch in (1, 3):
        assert_same_outputs(model, out, batch=batch)


def test_the_callers_model_is_not_changed():
    model = cnn_model()
    before = model.SerializeToString()
    decompose(model)
    prune(model, energy=0.9)
    prune(model, target_params=0.6)
    assert model.SerializeToString() == before
    irm = ir.serde.deserialize_model(onnx.load_from_string(before))
    ir_before = ir.to_proto(irm).SerializeToString()
    decompose(irm)
    prune(irm, energy=0.9)
    assert ir.to_proto(irm).SerializeToString() == ir_before


# ---------------------------------------------------------------------------------------------
# Data-free pruning


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return cnn_model(decay=10.0)


@pytest.fixture(scope="module")
def cnn_feeds(cnn) -> dict[str, np.ndarray]:
    return random_feeds(cnn, batch=4)


def _check_report(result, out: onnx.ModelProto) -> None:
    """The report's kept ranks and params match the graph."""
    assert result.pruned.params == initializer_params(out)
    nodes = _nodes(out)
    for layer in result.layers:
        if layer.action == "decomposed":
            assert int(_meta(nodes[f"{layer.name}.basis"])["basisprune.kept_rank"]) == layer.kept_rank
            basis_w = _init(out, nodes[f"{layer.name}.basis"].input[1])
            basis = nodes[f"{layer.name}.basis"]
            groups = next((a.i for a in basis.attribute if a.name == "group"), 1)
            rank_axis = 1 if layer.op == "MatMul" else 0  # MatMul basis is (K, r), Conv (g*r, ...), Gemm (r, K)
            assert basis_w.dims[rank_axis] == layer.kept_rank * groups
        elif layer.action in ("recomposed", "kept", "skipped"):
            assert layer.name in nodes and f"{layer.name}.basis" not in nodes


def test_energy_0999_stays_close(cnn, cnn_feeds):
    result = prune(cnn, energy=0.999)
    out = result.to_proto()
    onnx.checker.check_model(out, full_check=True)
    _check_report(result, out)
    assert result.pruned.params <= result.original.params
    (ref,), (got,) = run(cnn, cnn_feeds), run(out, cnn_feeds)
    assert max_rel_error(ref, got) < 0.05


def test_energy_05_has_strictly_fewer_params(cnn, cnn_feeds):
    result = prune(cnn, energy=0.5)
    out = result.to_proto()
    _check_report(result, out)
    assert result.pruned.params < result.original.params
    assert initializer_params(out) < initializer_params(cnn)
    assert result.pruned.macs < result.original.macs
    assert any(layer.action == "decomposed" for layer in result.layers)
    (got,) = run(out, cnn_feeds)
    assert got.shape == (4, 100) and np.isfinite(got).all()


def test_lower_energy_never_keeps_more(cnn):
    params = [prune(cnn, energy=e).pruned.params for e in (0.9999, 0.999, 0.99, 0.9, 0.5)]
    assert params == sorted(params, reverse=True)


@pytest.mark.parametrize("key", ["target_params", "target_macs"])
@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_budget_targets_are_met(cnn, cnn_feeds, key, fraction):
    result = prune(cnn, **{key: fraction})
    out = result.to_proto()
    onnx.checker.check_model(out, full_check=True)
    _check_report(result, out)
    attr = "params" if key == "target_params" else "macs"
    ratio = getattr(result.pruned, attr) / getattr(result.original, attr)
    assert ratio <= fraction
    assert ratio >= fraction - 0.2, f"{attr} ratio {ratio:.3f} much below the target {fraction}"
    (got,) = run(out, cnn_feeds)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("key", ["target_params", "target_macs"])
def test_out_of_reach_target_raises(cnn, key):
    with pytest.raises(BasisPruneError, match="out of reach"):
        prune(cnn, **{key: 0.01})


@pytest.mark.parametrize("kwargs", [dict(energy=0.0), dict(energy=1.5), dict(target_params=0.0), dict(target_macs=-1.0),
                                    dict(energy=0.9, target_params=0.5)])
def test_invalid_targets_raise(cnn, kwargs):
    with pytest.raises(BasisPruneError):
        prune(cnn, **kwargs)


def test_recomposed_layers_keep_the_op_count(cnn, cnn_feeds):
    result = prune(cnn, energy=0.95)
    recomposed = [layer for layer in result.layers if layer.action == "recomposed"]
    assert recomposed, [(layer.name, layer.action) for layer in result.layers]
    out = result.to_proto()
    _check_report(result, out)
    nodes = _nodes(out)
    decomposed = sum(layer.action == "decomposed" for layer in result.layers)
    assert len(out.graph.node) == len(cnn.graph.node) + decomposed
    original = _nodes(cnn)
    for layer in recomposed:
        node = nodes[layer.name]
        assert node.op_type == original[layer.name].op_type
        w_new = numpy_helper.to_array(_init(out, node.input[1])).astype(np.float64)
        w_old = numpy_helper.to_array(_init(cnn, original[layer.name].input[1])).astype(np.float64)
        assert w_new.shape == w_old.shape
        assert np.linalg.matrix_rank(w_new.reshape(w_new.shape[0], -1), tol=1e-5 * np.abs(w_new).max()) == layer.kept_rank
        # bias untouched
        assert node.input[2] == original[layer.name].input[2]


def test_recompose_at_every_rank_is_the_truncated_weight(cnn):
    """Recomposing a layer (same op) equals the numpy truncation U_r S_r V_r^T."""
    result = prune(cnn, energy=0.95)
    layer = next(layer for layer in result.layers if layer.action == "recomposed")
    out = result.to_proto()
    w = numpy_helper.to_array(_init(cnn, _nodes(cnn)[layer.name].input[1])).astype(np.float64)
    mat = w.reshape(w.shape[0], -1)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    r = layer.kept_rank
    expected = (u[:, :r] * s[:r]) @ vt[:r]
    got = numpy_helper.to_array(_init(out, _nodes(out)[layer.name].input[1])).astype(np.float64).reshape(mat.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(mat).max())


@pytest.mark.parametrize("block", [8, 16])
def test_kept_ranks_are_aligned_to_the_block(cnn, monkeypatch, block):
    monkeypatch.setenv("BASISPRUNE_BLOCK", str(block))
    for kwargs in (dict(energy=0.9), dict(energy=0.99), dict(target_params=0.7)):
        result = prune(cnn, **kwargs)
        out = result.to_proto()
        nodes = _nodes(out)
        decomposed = [layer for layer in result.layers if layer.action == "decomposed"]
        assert decomposed
        for layer in decomposed:
            assert layer.kept_rank % block == 0 or layer.kept_rank == layer.full_rank, (kwargs, layer)
            channels = _init(out, nodes[f"{layer.name}.basis"].input[1]).dims[0]
            assert channels % block == 0 or layer.kept_rank == layer.full_rank


def test_block_1_keeps_exact_energy_ranks(cnn, monkeypatch):
    monkeypatch.setenv("BASISPRUNE_BLOCK", "1")
    prepared = prepare(cnn)
    result = prune(cnn, energy=0.9)
    from onnx_basisprune.basis.svd import energy_rank

    for layer in result.layers:
        if layer.action in ("decomposed", "recomposed"):
            assert layer.kept_rank == energy_rank(prepared.layers[layer.name].svd.s, 0.9)


# ---------------------------------------------------------------------------------------------
# Names already taken


def test_a_model_this_tool_wrote_decomposes_again():
    model = cnn_model()
    once = decompose(model).to_proto()
    twice = decompose(once)
    assert {layer.name for layer in twice.layers if layer.action == "decomposed"} >= {"conv2.basis", "conv2.scaling"}
    out = twice.to_proto()
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, out)
    # and prunes again
    pruned = prune(prune(model, energy=0.95).to_proto(), energy=0.9)
    onnx.checker.check_model(pruned.to_proto(), full_check=True)


def test_existing_value_and_initializer_names_do_not_collide():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Add", ["x", "conv.basis.weight"], ["y.basis"], name="add"),
        helper.make_node("Conv", ["y.basis", "W"], ["y"], name="conv", kernel_shape=[3, 3]),
    ]
    inits = [tensor("W", rng.standard_normal((24, 16, 3, 3)).astype(np.float32)),
             tensor("conv.basis.weight", np.ones(1, np.float32))]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["N", 16, *SPATIAL])], [("y", TensorProto.FLOAT, ["N", 24, None, None])], inits)
    out = _decompose_exact(model)
    assert numpy_helper.to_array(_init(out, "conv.basis.weight")).shape == (1,)
    assert_same_outputs(model, out)


def test_budget_ranking_is_per_unit_of_the_budgeted_cost(cnn):
    """Under a MACs budget a basis of a layer with many output positions is worth more MACs:
    scores are divided by each layer's per-basis cost (params or MACs)."""
    from onnx_basisprune.plan import ranks
    from onnx_basisprune.api import prepare

    prepared = prepare(cnn)
    scores = {name: ranks.energy_scores(layer) for name, layer in prepared.splittable().items()}
    for kind in ("params", "macs"):
        weighted = ranks.per_unit_cost(scores, prepared.layers, kind)
        unit = {n: prepared.layers[n].split_params(1) * (prepared.layers[n].positions if kind == "macs" else 1) for n in scores}
        names = list(scores)
        ratios = [weighted[n].scores[0, 0] / scores[n].scores[0, 0] * unit[n] for n in names]
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)
        for n in names:
            np.testing.assert_array_equal(weighted[n].order, scores[n].order)
