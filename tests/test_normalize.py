"""Weights in every form real exports use are normalised into plain initializers, and each model
decomposes exactly; loading and saving with external data."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import assert_same_outputs, initializer_params, make_model, random_feeds, run, tensor
from onnx import TensorProto, helper

import onnx_basisprune.io.model_io as modelio
from onnx_basisprune import BasisPruneError, decompose, prune
from onnx_basisprune.io.normalize import normalize

SPATIAL = (20, 21)
X = [("x", TensorProto.FLOAT, ["N", 16, *SPATIAL])]
Y = [("y", TensorProto.FLOAT, ["N", 24, None, None])]


@pytest.fixture(scope="module")
def wb() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((24, 16, 3, 3)).astype(np.float32) / 12, rng.standard_normal(24).astype(np.float32)


def _conv(weight: str = "W", bias: str | None = "B", out: str = "y") -> onnx.NodeProto:
    return helper.make_node("Conv", ["x", weight] + ([bias] if bias else []), [out], name="conv", kernel_shape=[3, 3])


def _exact(model: onnx.ModelProto, tol: float = 1e-4) -> onnx.ModelProto:
    result = decompose(model)
    assert [(layer.name, layer.action) for layer in result.layers] == [("conv", "decomposed")]
    out = result.to_proto()
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node if n.op_type == "Conv"] == ["Conv", "Conv"]
    assert_same_outputs(model, out, tol=tol)
    return out


def test_weight_as_constant_nodes(wb):
    w, b = wb
    nodes = [
        helper.make_node("Constant", [], ["W"], value=tensor("Wc", w)),
        helper.make_node("Constant", [], ["B"], value=tensor("Bc", b)),
        _conv(),
    ]
    out = _exact(make_model(nodes, X, Y))
    assert "Constant" not in {n.op_type for n in out.graph.node}


def test_weight_through_identity(wb):
    w, b = wb
    nodes = [helper.make_node("Identity", ["W0"], ["W"]), helper.make_node("Identity", ["B0"], ["B1"]), _conv(bias="B1")]
    out = _exact(make_model(nodes, X, Y, [tensor("W0", w), tensor("B0", b)]))
    assert "Identity" not in {n.op_type for n in out.graph.node}


def test_weight_through_cast_and_transpose(wb):
    w, b = wb
    nodes = [
        helper.make_node("Cast", ["W16"], ["W32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["W32"], ["W"], perm=[1, 0, 2, 3]),
        _conv(),
    ]
    model = make_model(nodes, X, Y, [tensor("W16", w.transpose(1, 0, 2, 3).astype(np.float16)), tensor("B", b)])
    _exact(model)


def test_weight_from_constant_of_shape_chain(wb):
    w, b = wb
    zero = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=zero),
        helper.make_node("Add", ["zeros", "W0"], ["W"]),
        helper.make_node("ConstantOfShape", ["bshape"], ["B"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25])),
        _conv(),
    ]
    inits = [tensor("W0", w), tensor("shape", np.array(w.shape, dtype=np.int64)), tensor("bshape", np.array([24], dtype=np.int64))]
    out = _exact(make_model(nodes, X, Y, inits))
    assert not {"ConstantOfShape", "Add"} & {n.op_type for n in out.graph.node}


def test_weight_from_constant_of_shape_alone_with_a_scale(wb):
    w, b = wb
    one = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=one),
        helper.make_node("Mul", ["ones", "W0"], ["W1"]),
        helper.make_node("Identity", ["W1"], ["W"]),
        _conv(),
    ]
    inits = [tensor("W0", w), tensor("B", b), tensor("shape", np.array(w.shape, dtype=np.int64))]
    _exact(make_model(nodes, X, Y, inits))


def test_constant_of_shape_on_activations_stays_a_node(wb):
    """A ConstantOfShape that feeds activations is not materialised (no model growth)."""
    w, b = wb
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Add", ["x", "zeros"], ["x2"]),
        helper.make_node("Conv", ["x2", "W", "B"], ["y"], name="conv", kernel_shape=[3, 3]),
    ]
    inits = [tensor("W", w), tensor("B", b), tensor("shape", np.array([1, 16, *SPATIAL], dtype=np.int64))]
    model = make_model(nodes, X, Y, inits)
    out = _exact(model)
    assert "ConstantOfShape" in {n.op_type for n in out.graph.node}


def test_old_ir_with_initializers_as_graph_inputs(wb):
    w, b = wb
    model = make_model([_conv()], X, Y, [tensor("W", w), tensor("B", b)], opset=9, ir_version=3, initializers_as_inputs=True)
    assert {i.name for i in model.graph.input} == {"x", "W", "B"}
    out = _exact(model)  # full checker included
    assert [i.name for i in out.graph.input] == ["x"]
    assert out.ir_version >= 4
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [9]
    # runs feeding only the real input
    feeds = random_feeds(out)
    assert set(feeds) == {"x"}
    run(out, feeds)


def test_initializers_listed_as_inputs_in_a_recent_ir(wb):
    w, b = wb
    model = make_model([_conv()], X, Y, [tensor("W", w), tensor("B", b)], initializers_as_inputs=True)
    out = _exact(model)
    assert [i.name for i in out.graph.input] == ["x"]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("opset,ir_version,as_inputs", [(17, None, False), (9, 3, True)], ids=["opset17", "opset9-ir3"])
def test_batchnorm_after_conv_is_folded(wb, with_bias, opset, ir_version, as_inputs):
    w, b = wb
    rng = np.random.default_rng(1)
    bn = [
        tensor("gamma", rng.uniform(0.5, 2, 24).astype(np.float32)),
        tensor("beta", rng.standard_normal(24).astype(np.float32)),
        tensor("mean", rng.standard_normal(24).astype(np.float32)),
        tensor("var", rng.uniform(0.2, 3, 24).astype(np.float32)),
    ]
    nodes = [
        _conv(bias="B" if with_bias else None, out="h"),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=1e-3),
    ]
    inits = [tensor("W", w)] + ([tensor("B", b)] if with_bias else []) + bn
    model = make_model(nodes, X, Y, inits, opset=opset, ir_version=ir_version, initializers_as_inputs=as_inputs)
    out = _exact(model)
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    names = {n.name for n in out.graph.node}
    assert {"conv.basis", "conv.scaling"} <= names, names


def test_batchnorm_after_gemm_and_a_gemm_weight_through_identity():
    rng = np.random.default_rng(2)
    k, n = 256, 200
    nodes = [
        helper.make_node("Identity", ["W0"], ["W"]),
        helper.make_node("Gemm", ["x", "W", "C"], ["h"], name="fc", transB=1),
        helper.make_node("Unsqueeze", ["h", "axes"], ["h4"]),
        helper.make_node("BatchNormalization", ["h4", "g", "be", "mu", "var"], ["y4"], name="bn"),
        helper.make_node("Squeeze", ["y4", "axes"], ["y"]),
    ]
    inits = [tensor("W0", rng.standard_normal((n, k)).astype(np.float32)), tensor("C", rng.standard_normal(n).astype(np.float32)),
             tensor("axes", np.array([2, 3], dtype=np.int64)),
             tensor("g", rng.uniform(0.5, 2, n).astype(np.float32)), tensor("be", rng.standard_normal(n).astype(np.float32)),
             tensor("mu", rng.standard_normal(n).astype(np.float32)), tensor("var", rng.uniform(0.2, 3, n).astype(np.float32))]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["N", k])], [("y", TensorProto.FLOAT, ["N", n])], inits)
    result = decompose(model)
    assert {layer.name: layer.action for layer in result.layers} == {"fc": "decomposed"}
    assert_same_outputs(model, result.to_proto())


def test_normalize_alone_names_every_node_and_lifts_constants(wb):
    w, b = wb
    nodes = [helper.make_node("Constant", [], ["W"], value=tensor("Wc", w)),
             helper.make_node("Conv", ["x", "W", "B"], ["h"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, X, Y, [tensor("B", b)])
    irm = ir.serde.deserialize_model(model)
    normalize(irm)
    names = [node.name for node in irm.graph]
    assert all(names) and len(set(names)) == len(names)
    assert [node.op_type for node in irm.graph] == ["Conv", "Relu"]
    assert "W" in irm.graph.initializers
    assert_same_outputs(model, ir.to_proto(irm))


# ---------------------------------------------------------------------------------------------
# External data


def _cnn_on_disk(tmp_path, wb, name: str = "model.onnx") -> tuple[onnx.ModelProto, object]:
    w, b = wb
    model = make_model([_conv()], X, Y, [tensor("W", w), tensor("B", b)])
    path = tmp_path / name
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # onnx.save_model turns the proto it saves into external references
    onnx.save_model(on_disk, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=0)
    assert (tmp_path / (name + ".data")).is_file()
    return model, path


def test_decompose_a_model_with_external_data(tmp_path, wb):
    model, path = _cnn_on_disk(tmp_path, wb)
    result = decompose(path)
    out_path = tmp_path / "out.onnx"
    written = modelio.save_model(result.model, out_path)
    assert written == [out_path]
    loaded = onnx.load(str(out_path))
    onnx.checker.check_model(loaded, full_check=True)
    assert_same_outputs(model, out_path)
    assert_same_outputs(path, loaded)
    # the output holds all its weights: it does not point into the input's data file
    bare = onnx.load(str(out_path), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in bare.graph.initializer)
    # pruning from the path works too and the saved file is self-contained
    pruned = prune(path, energy=0.9)
    pruned.save(tmp_path / "pruned.onnx")
    run(tmp_path / "pruned.onnx", random_feeds(model))


def test_external_data_in_another_folder_than_the_cwd(tmp_path, wb, monkeypatch):
    sub = tmp_path / "models"
    sub.mkdir()
    model, path = _cnn_on_disk(sub, wb)
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the data file resolves against the model's folder, not the cwd
    result = decompose(path)
    result.save(other / "a.onnx")
    assert_same_outputs(model, other / "a.onnx")
    monkeypatch.chdir(tmp_path)
    result = decompose("models/model.onnx")  # a relative path
    result.save("b.onnx")
    assert_same_outputs(model, tmp_path / "b.onnx")


def test_to_proto_of_a_model_with_external_data_is_self_contained(tmp_path, wb, monkeypatch):
    sub = tmp_path / "models"
    sub.mkdir()
    model, path = _cnn_on_disk(sub, wb)
    monkeypatch.chdir(tmp_path)
    proto = decompose(path).to_proto()
    assert all(t.data_location != TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert_same_outputs(model, proto)


def test_save_writes_external_data_above_the_threshold(tmp_path, wb, monkeypatch):
    w, b = wb
    model = make_model([_conv()], X, Y, [tensor("W", w), tensor("B", b)])
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)
    result = decompose(model)
    out = tmp_path / "split.onnx"
    written = modelio.save_model(result.model, out)
    data = tmp_path / "split.onnx.data"
    assert written == [out, data]
    assert data.is_file() and data.stat().st_size >= 4 * (24 * 16 * 9)
    bare = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in bare.graph.initializer)
    loaded = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert initializer_params(loaded) == result.pruned.params
    assert_same_outputs(model, out)
    # no temporary folders are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.onnx", "split.onnx.data"]
    # and the saved model is a valid input again
    again = decompose(out)
    assert_same_outputs(model, again.to_proto())


def test_save_refuses_bad_destinations(tmp_path, wb):
    w, b = wb
    result = decompose(make_model([_conv()], X, Y, [tensor("W", w), tensor("B", b)]))
    with pytest.raises(BasisPruneError, match="directory"):
        modelio.save_model(result.model, tmp_path)
    with pytest.raises(BasisPruneError, match="does not exist"):
        modelio.save_model(result.model, tmp_path / "missing" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_load_model_errors(tmp_path):
    with pytest.raises(BasisPruneError, match="no such file"):
        modelio.load_model(tmp_path / "nope.onnx")
    with pytest.raises(BasisPruneError, match="not a file"):
        modelio.load_model(tmp_path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(BasisPruneError):
        modelio.load_model(junk)


def test_missing_external_data_file_is_a_clear_error(tmp_path, wb):
    _, path = _cnn_on_disk(tmp_path, wb)
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(BasisPruneError):
        decompose(path)


def test_external_input_saved_with_external_output_elsewhere(tmp_path, wb, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    model, path = _cnn_on_disk(src, wb)
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)
    result = decompose(path)
    written = modelio.save_model(result.model, dst / "out.onnx")
    assert written == [dst / "out.onnx", dst / "out.onnx.data"]
    # the input's files can go away: the output stands alone
    for f in list(src.iterdir()):
        f.unlink()
    assert_same_outputs(model, dst / "out.onnx")
