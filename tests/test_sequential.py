"""Sequential data-aware reconstruction and scaling-factor tuning on small models (Torch side)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest
import torch

from conftest import make_model, tensor
from onnx_basisprune.plan import ranks
from onnx_basisprune.pipeline.prepared import prepare, rewritten
from onnx_basisprune.calibration.importance import PassSettings, _input_rows
from onnx_basisprune.calibration.interpreter import OnnxTorchModule
from onnx_basisprune.calibration.reconstruction import layer_statistics, sampled_rows
from onnx_basisprune.calibration.tuning import tune
from onnx_basisprune.channels.refit import ConsumerInput
from onnx_basisprune.basis.data_aware import (SequentialBuilder, allocation_scores, layer_targets, tuning_sites, with_factors,
                                        with_tuning)
from onnx_basisprune.basis.reconstruct import fit_layer
from onnx_basisprune.runtime.session import new_session as session

BATCH = 16


def _cnn(seed: int = 3):
    """4 Conv + Relu, GlobalAveragePool, Gemm on [N, 3, 32, 32], He-scaled weights whose spectra
    decay slowly (so the signal carries through and low ranks lose something)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    convs = [("conv1", 3, 16, 3, 1), ("conv2", 16, 32, 3, 2), ("conv3", 32, 32, 3, 1), ("conv4", 32, 64, 1, 1)]
    nodes, inits, x = [], [], "input"

    def weight(out_ch: int, fan_in: int) -> np.ndarray:
        u, _ = np.linalg.qr(rng.standard_normal((out_ch, out_ch)))
        v, _ = np.linalg.qr(rng.standard_normal((fan_in, out_ch)) if fan_in >= out_ch else rng.standard_normal((fan_in, fan_in)))
        r = min(out_ch, fan_in)
        s = np.exp(-np.arange(r) / (r / 3)) * np.sqrt(2.0 * out_ch)
        return ((u[:, :r] * s) @ v[:, :r].T).astype(np.float32)

    for name, cin, cout, k, stride in convs:
        inits += [tensor(f"{name}.weight", weight(cout, cin * k * k).reshape(cout, cin, k, k)),
                  tensor(f"{name}.bias", 0.1 * rng.standard_normal(cout).astype(np.float32))]
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride]))
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}.relu"))
        x = f"{name}.relu"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    inits += [tensor("fc.weight", weight(10, 64)), tensor("fc.bias", rng.standard_normal(10).astype(np.float32))]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    return make_model(nodes, [("input", TensorProto.FLOAT, ["N", 3, 32, 32])], [("logits", TensorProto.FLOAT, ["N", 10])], inits)


@pytest.fixture(scope="module")
def setup():
    prepared = prepare(_cnn())
    rng = np.random.default_rng(0)
    data = [({"input": rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)}, None) for _ in range(6)]
    targets = layer_targets(prepared.model, prepared.layers, prepared.shapes)
    module = OnnxTorchModule(ir.to_proto(prepared.model))
    stats = layer_statistics(module, {name: t.site() for name, t in targets.items()}, data, PassSettings("self", progress=False))
    builder = SequentialBuilder(module, targets, stats.fisher, lambda: iter(data), "cpu", 0, False)
    return prepared, data, targets, stats, builder, module


def _plan(prepared, cut: dict[str, int]):
    """Decisions cutting the named layers to the given rank, every other layer kept."""
    plan = {}
    for name, layer in prepared.layers.items():
        if name in cut:
            plan[name] = ranks.decide(layer, None, cut[name], block=1)
        else:
            plan[name] = ranks.decide(layer, None, layer.full_rank, block=1)
    return plan


def _outputs(model: ir.Model, data) -> np.ndarray:
    sess = session(model)
    return np.concatenate([sess.run(None, feeds)[0] for feeds, _ in data])


def test_sampled_rows_are_rows_of_the_full_im2col():
    read = ConsumerInput("c", "x", 4 * 9, groups=2, kernel=(3, 3), pads=(1, 0, 2, 1), strides=(2, 1), dilations=(1, 2))
    x = torch.randn(3, 8, 9, 10)
    full = _input_rows(read, x)
    (rows,) = sampled_rows(read, [x], 25, torch.Generator().manual_seed(0))
    assert rows.shape == (25, full.shape[1])
    distance = torch.cdist(rows, full, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert float(distance.max()) < 1e-5


def test_sampled_rows_pair_the_same_positions():
    read = ConsumerInput("c", "x", 3 * 9, kernel=(3, 3), pads=(1, 1, 1, 1))
    x = torch.randn(2, 3, 6, 6)
    a, b = sampled_rows(read, [x, 2 * x], 10, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b, 2 * a)


def test_sampled_output_rows_pair_the_input_positions():
    """Rows of a tensor shaped like the layer's output come from the sampled output positions:
    for a 1x1 convolution they are the input rows themselves."""
    read = ConsumerInput("c", "x", 5, kernel=(1, 1), pads=(0, 0, 0, 0))
    x = torch.randn(3, 5, 4, 6)
    rows, outputs = sampled_rows(read, [x], 20, torch.Generator().manual_seed(2), [x])
    torch.testing.assert_close(outputs, rows)
    fc = ConsumerInput("fc", "x", 7)
    v = torch.randn(30, 7)
    rows, outputs = sampled_rows(fc, [v], 12, torch.Generator().manual_seed(3), [2 * v])
    torch.testing.assert_close(outputs, 2 * rows)


def _residual_cnn(seed: int = 5):
    """conv_in + Relu, then a residual block: conv_a + Relu, conv_b, Add(conv_b, block input),
    Relu; GlobalAveragePool, Gemm."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for name, cin, x, out in (("conv_in", 3, "input", "h0"), ("conv_a", 16, "h0", "h1"), ("conv_b", 16, "h1", None)):
        w = rng.standard_normal((16, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        inits += [tensor(f"{name}.weight", w.astype(np.float32)), tensor(f"{name}.bias", 0.1 * rng.standard_normal(16).astype(np.float32))]
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name, kernel_shape=[3, 3], pads=[1] * 4))
        if out:
            nodes.append(helper.make_node("Relu", [f"{name}.out"], [out], name=f"{name}.relu"))
    nodes += [helper.make_node("Add", ["conv_b.out", "h0"], ["sum"], name="add"), helper.make_node("Relu", ["sum"], ["h2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["h2"], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    inits += [tensor("fc.weight", rng.standard_normal((10, 16)).astype(np.float32)), tensor("fc.bias", np.zeros(10, np.float32))]
    return make_model(nodes, [("input", TensorProto.FLOAT, ["N", 3, 16, 16])], [("logits", TensorProto.FLOAT, ["N", 10]), ("sum", TensorProto.FLOAT, ["N", 16, 16, 16])], inits)


def test_the_last_layer_of_a_residual_branch_makes_up_the_shortcut_error():
    """conv_in cut changes the shortcut h0 too; conv_b, fitted with the shortcut's error as part
    of its target, brings the block's sum closer to the original's than a fit of its own output."""
    prepared = prepare(_residual_cnn())
    rng = np.random.default_rng(0)
    data = [({"input": rng.standard_normal((BATCH, 3, 16, 16)).astype(np.float32)}, None) for _ in range(4)]
    targets = layer_targets(prepared.model, prepared.layers, prepared.shapes)
    assert {name: t.branch for name, t in targets.items()} == {"conv_in": None, "conv_a": None, "conv_b": "h0", "fc": None}
    module = OnnxTorchModule(ir.to_proto(prepared.model))
    weights = {name: np.ones(1) for name in targets}
    plan = _plan(prepared, {"conv_in": 3})

    def block_sum(targets) -> float:
        decisions = SequentialBuilder(module, targets, weights, lambda: iter(data), "cpu", 0, False).decisions(plan)
        model, reference = rewritten(prepared, decisions), prepared.model
        got, want = (np.concatenate([session(m).run(["sum"], feeds)[0] for feeds, _ in data]) for m in (model, reference))
        return float(((got - want) ** 2).mean())

    without = {name: replace(t, branch=None) for name, t in targets.items()}
    assert block_sum(targets) < 0.9 * block_sum(without)


def test_full_rank_split_with_sequential_fit_reproduces_the_model(setup):
    prepared, data, _, _, builder, _ = setup
    plan = _plan(prepared, {})
    plan["conv2"] = ranks.decide(prepared.layers["conv2"], None, prepared.layers["conv2"].full_rank, 1, split_full_rank=True)
    assert all(d.factors is None for d in builder.decisions(_plan(prepared, {})).values())  # nothing cut, nothing fitted
    decisions = builder.decisions(plan)
    assert decisions["conv2"].factors is not None
    reference, got = _outputs(prepared.model, data), _outputs(rewritten(prepared, decisions), data)
    assert np.abs(got - reference).max() <= 1e-3 * np.abs(reference).max()


def test_sequential_fit_error_is_never_above_the_independent_fit(setup):
    prepared, data, targets, stats, builder, _ = setup
    reference = _outputs(prepared.model, data)
    assert reference.std(axis=0).mean() > 0.1  # the inputs matter: errors are measurable
    for cut in ({"conv2": 8, "conv3": 8}, {"conv1": 4, "conv3": 6, "conv4": 12}):
        plan = _plan(prepared, cut)
        independent = with_factors(plan, {name: fit_layer(targets[name].weight, targets[name].bias, stats.moments[name], rank)
                                          for name, rank in cut.items()})
        sequential = builder.decisions(plan)
        err_ind = float(((_outputs(rewritten(prepared, independent), data) - reference) ** 2).mean())
        err_seq = float(((_outputs(rewritten(prepared, sequential), data) - reference) ** 2).mean())
        assert err_seq <= err_ind
        assert {name: d.rank for name, d in sequential.items() if name in cut} == cut


def test_a_layer_cut_above_break_even_is_kept_whole(setup):
    """A cut that would not pay (``recomposed`` by the cost model) keeps the layer whole: with its
    original weights when its input is unchanged, refitted at full rank when an earlier cut
    changed it; never recomposed at the lower rank, which would lose accuracy and save nothing."""
    prepared, data, _, _, builder, _ = setup
    plan = _plan(prepared, {"conv3": 4})
    for name, rank in (("conv1", 14), ("conv4", 30)):  # above break-even: recomposed by the plan
        plan[name] = ranks.decide(prepared.layers[name], None, rank, block=1)
        assert plan[name].action == "recomposed"
    decisions = builder.decisions(plan)
    assert decisions["conv1"].action == "kept" and decisions["conv1"].factors is None  # upstream of every cut
    assert decisions["conv4"].action == "kept" and decisions["conv4"].factors.rank == prepared.layers["conv4"].full_rank
    model = rewritten(prepared, decisions)
    weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values() if v.const_value is not None}
    np.testing.assert_array_equal(weights["conv1.weight"], prepared.model.graph.initializers["conv1.weight"].const_value.numpy())
    assert sum(node.op_type == "Conv" for node in model.graph) == 5  # conv3 split in two, the rest one node each


def test_fisher_scores_rank_every_splittable_layer(setup):
    prepared, _, targets, stats, _, _ = setup
    scores = allocation_scores(targets, stats.moments, stats.fisher, "fisher")
    assert set(scores) == set(prepared.splittable())
    for s in scores.values():
        assert (np.diff(s.scores, axis=1) <= 1e-12).all() and (s.scores >= 0).all()


def test_tuning_changes_only_scaling_factors_and_biases(setup):
    """Start from a fit whose conv3 factors and biases were knocked off: tuning must undo most of
    that, and fold into nothing but the scaling columns and the biases."""
    prepared, data, _, _, builder, module = setup
    fitted = builder.decisions(_plan(prepared, {"conv2": 6, "conv3": 6}))
    knocked = with_tuning(fitted, {"conv3": np.full(6, 1.5)}, {"conv3": np.full(32, 0.3)})
    model = rewritten(prepared, knocked)
    sites = tuning_sites(model, knocked)
    assert {(s.layer, s.kind) for s in sites} >= {("conv2", "scale"), ("conv2", "bias"), ("conv3", "scale"), ("conv3", "bias")}
    inputs = {"input": np.concatenate([feeds["input"] for feeds, _ in data])}
    result = tune(OnnxTorchModule(ir.to_proto(model)), module, sites, inputs, steps=40, batch_size=48, lr=2e-2, progress=False)
    assert result.loss_after < 0.5 * result.loss_before
    tuned = with_tuning(knocked, result.scales, result.biases)
    for name, before in knocked.items():
        after = tuned[name]
        if before.factors is None:
            assert after is before
            continue
        np.testing.assert_array_equal(after.factors.basis, before.factors.basis)  # no weight is tuned
        ratio = after.factors.scaling / before.factors.scaling
        np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :], ratio.shape), rtol=1e-9)  # one factor per basis
    reference = _outputs(prepared.model, data)
    error = lambda d: float(((_outputs(rewritten(prepared, d), data) - reference) ** 2).mean())  # noqa: E731
    assert error(tuned) < error(knocked)  # the folded model improves as the hooked one did
