"""The Torch-backed importance stage and the least-squares scaling it feeds, against brute force."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_basisprune.basis import svd as svdlib
from onnx_basisprune.calibration.importance import ChannelSite, Gate, PassSettings, choose_loss, measure_channel_importance, measure_importance
from onnx_basisprune.calibration.interpreter import OnnxTorchModule


def _tiny_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv(3->6) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(6->4)."""
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((4, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _brute_force(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample dL_n/ds for an explicit gate s=1 on the Conv output, sample by sample."""
    module = OnnxTorchModule(model)
    grads = []
    for n in range(len(x)):
        s = torch.ones(6, dtype=torch.float64, requires_grad=True)
        hooks = {"c": lambda t: t * s.float().view(1, -1, 1, 1)}
        out = module(x=torch.from_numpy(x[n : n + 1]), hooks=hooks)[0]
        torch.nn.functional.cross_entropy(out, torch.from_numpy(labels[n : n + 1])).backward()
        grads.append(s.grad.numpy().copy())
    return np.stack(grads)


def test_taylor_statistics_match_per_sample_autograd():
    rng = np.random.default_rng(0)
    model = _tiny_model(rng)
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 10).astype(np.int64)
    g = _brute_force(model, x, labels)
    batches = [({"x": x[:4]}, labels[:4]), ({"x": x[4:]}, labels[4:])]
    result = measure_importance(OnnxTorchModule(model), {"conv": Gate("c", 1)}, batches, PassSettings("labels", device="cpu", progress=False))
    assert result.samples == 10
    np.testing.assert_allclose(result.taylor["conv"], np.abs(g.mean(axis=0)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.taylor_sq["conv"], (g**2).mean(axis=0), rtol=1e-4, atol=1e-9)
    # moments of the gated tensor itself, over samples and positions
    feats = _conv_output(model, x).transpose(0, 2, 3, 1).reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(result.second["conv"][0], feats.T @ feats / len(feats), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.mean["conv"][0], feats.mean(axis=0), rtol=1e-4, atol=1e-6)


def _conv_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    captured = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        captured["c"] = t.detach().numpy()
        return t

    OnnxTorchModule(model)(x=torch.from_numpy(x), hooks={"c": keep})
    return captured["c"]


def test_choose_loss():
    assert choose_loss((1, 10), labeled=True) == "labels"
    assert choose_loss((1, 10), labeled=False) == "self"
    assert choose_loss((1, 3, 8, 8), labeled=True) == "projection"


def test_projection_loss_gives_nonzero_squared_importance():
    rng = np.random.default_rng(1)
    model = _tiny_model(rng)
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    result = measure_importance(OnnxTorchModule(model), {"conv": Gate("c", 1)}, [({"x": x}, None)], PassSettings("projection", device="cpu", progress=False))
    assert np.all(result.taylor_sq["conv"] >= 0) and result.taylor_sq["conv"].sum() > 0


def _random_stats(rng: np.random.Generator, groups: int, rank: int, samples: int = 500) -> tuple[svdlib.BasisStats, np.ndarray]:
    b = rng.standard_normal((groups, samples, rank)) @ rng.standard_normal((groups, rank, rank)) + rng.standard_normal((groups, 1, rank))
    second = np.einsum("gmr,gms->grs", b, b) / samples
    return svdlib.BasisStats(second=second, mean=b.mean(axis=1)), b


def test_least_squares_keeps_everything_when_nothing_dropped():
    rng = np.random.default_rng(2)
    svd = svdlib.grouped_svd(rng.standard_normal((2, 5, 12)))
    stats, _ = _random_stats(rng, 2, svd.rank)
    keep = svdlib.top_keep(2, svd.rank)
    scaling, delta = svdlib.least_squares_scaling(svd, keep, stats, with_bias=True, ridge=0.0)
    np.testing.assert_allclose(scaling, svdlib.scaling_matrix(svd, keep), atol=1e-8)
    np.testing.assert_allclose(delta, 0.0, atol=1e-8)


def test_least_squares_beats_plain_truncation_on_the_data():
    rng = np.random.default_rng(3)
    svd = svdlib.grouped_svd(rng.standard_normal((1, 8, 20)))
    stats, b = _random_stats(rng, 1, svd.rank)
    keep = np.array([[0, 2, 5]])
    full = b[0] @ (svd.u[0] * svd.s[0]).T
    plain = b[0][:, keep[0]] @ svdlib.scaling_matrix(svd, keep)[0].T
    scaling, delta = svdlib.least_squares_scaling(svd, keep, stats, with_bias=True, ridge=0.0)
    fitted = b[0][:, keep[0]] @ scaling[0].T + delta[0]
    err = lambda y: float(((y - full) ** 2).mean())  # noqa: E731
    assert err(fitted) < err(plain)
    # the fit is the least-squares optimum: residual orthogonal to the features and the constant
    resid = full - fitted
    feats = np.concatenate([b[0][:, keep[0]], np.ones((len(b[0]), 1))], axis=1)
    np.testing.assert_allclose(feats.T @ resid / len(resid), 0.0, atol=1e-8)


@pytest.mark.parametrize("groups", [1, 2])
def test_moments_for_grouped_gates(groups):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 4 // groups, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], group=groups), helper.make_node("ReduceMean", ["c"], ["y"], keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((3, 4, 6, 6)).astype(np.float32)
    result = measure_importance(OnnxTorchModule(model), {"c": Gate("c", 1, groups)}, [({"x": x}, None)], PassSettings("projection", device="cpu", progress=False))
    feats = _conv_output(model, x).transpose(0, 2, 3, 1).reshape(-1, groups, 4 // groups).astype(np.float64)
    for g in range(groups):
        np.testing.assert_allclose(result.second["c"][g], feats[:, g].T @ feats[:, g] / len(feats), rtol=1e-4, atol=1e-6)


def _residual_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Two Convs added (a residual merge), Relu, pooled into a Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("wa", (6, 3, 3, 3)), ("wb", (6, 3, 1, 1)), ("fc", (4, 6)))]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_channel_importance_is_the_derivative_of_one_gate_shared_by_its_sites():
    rng = np.random.default_rng(5)
    model = _residual_model(rng)
    x = rng.standard_normal((7, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 7).astype(np.int64)
    # groups: channel c of both Conv outputs is group c, except channel 5 (not gated); group 4
    # lives in 'a' only at channel 4 and in 'b' at channel 3 swapped with group 3, to test the mapping
    groups_a = np.array([0, 1, 2, 3, 4, -1])
    groups_b = np.array([0, 1, 2, 4, 3, -1])
    module = OnnxTorchModule(model)
    grads = []
    for n in range(len(x)):
        s = torch.ones(6, dtype=torch.float64, requires_grad=True)
        gate_a = torch.cat([s[:5], torch.ones(1, dtype=torch.float64)])
        gate_b = torch.cat([s[torch.tensor([0, 1, 2, 4, 3])], torch.ones(1, dtype=torch.float64)])
        hooks = {"a": lambda t: t * gate_a.float().view(1, -1, 1, 1), "b": lambda t: t * gate_b.float().view(1, -1, 1, 1)}
        out = module(x=torch.from_numpy(x[n : n + 1]), hooks=hooks)[0]
        torch.nn.functional.cross_entropy(out, torch.from_numpy(labels[n : n + 1])).backward()
        grads.append(s.grad.numpy()[:5].copy())
    g = np.stack(grads)
    sites = [ChannelSite("a", 1, groups_a), ChannelSite("b", 1, groups_b)]
    batches = [({"x": x[:3]}, labels[:3]), ({"x": x[3:]}, labels[3:])]
    result = measure_channel_importance(OnnxTorchModule(model), sites, 5, batches, PassSettings("labels", device="cpu", progress=False))
    assert result.samples == 7
    np.testing.assert_allclose(result.taylor, np.abs(g.mean(axis=0)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.taylor_sq, (g**2).mean(axis=0), rtol=1e-4, atol=1e-9)


def test_no_batch_activations_stay_alive_after_the_pass():
    """Memory must not grow with the calibration set: the gradient hooks must not keep each
    batch's activations alive (a hook holding its own tensor is a cycle through autograd's graph
    that Python's garbage collector cannot break)."""
    import gc
    import weakref

    from onnx_basisprune.calibration.importance import _taylor_batches

    rng = np.random.default_rng(6)
    model = _tiny_model(rng)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 8).astype(np.int64)
    seen: list[weakref.ref] = []
    batches = [({"x": x[i : i + 2]}, labels[i : i + 2]) for i in range(0, 8, 2)]
    for _ in _taylor_batches(OnnxTorchModule(model), {"c": 1}, batches, PassSettings("labels", device="cpu", progress=False),
                             on_forward=lambda name, t: seen.append(weakref.ref(t))):
        pass
    gc.collect()
    assert len(seen) == 4 and all(ref() is None for ref in seen)
