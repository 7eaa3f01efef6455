"""Double pruning: choosing channel groups (channels.select), the least-squares refit of the
layers that lose input channels (channels.refit and the moments gathered for it), and ``--double``
end to end on the built-in example.

Channel analysis and exact removal are covered by test_channels.py, basis importance by
test_importance.py and the plain main job by test_main_job.py; here every check is a number:
against NumPy (im2col, moments, least squares), against onnxruntime, or against ``analysis.cost``.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import EXAMPLE_MODEL, run, session
from onnx import TensorProto, helper, numpy_helper
from test_channels import Builder, group_of, image, normalised, out

from onnx_basisprune.calibration.importance import ChannelSite, _input_rows, _Moments, PassSettings, measure_channel_importance
from onnx_basisprune.calibration.interpreter import OnnxTorchModule
from onnx_basisprune.channels.refit import ConsumerInput, apply_refits, refit_consumers, refittable_consumers
from onnx_basisprune.channels.rewrite import remove_channels
from onnx_basisprune.channels.select import family_scores, per_unit_cost, removal_at, removal_for_budget
from onnx_basisprune.channels.analysis import ChannelAnalysis, analyse_channels
from onnx_basisprune.cli import main
from onnx_basisprune.io.cost import count_params, model_cost
from onnx_basisprune.basis.layers import find_layers
from onnx_basisprune.io.shapes import infer_shapes
from onnx_basisprune.plan.ranks import align

F = TensorProto.FLOAT
EXAMPLE = EXAMPLE_MODEL.parent


# ---------------------------------------------------------------------------------------------
# Helpers


def intermediates(proto: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of the tensors ``names`` on onnxruntime (a copy of the model with them as outputs)."""
    probe = copy.deepcopy(proto)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, F, None))
    sess = session(probe)
    values = sess.run(names, feeds)
    return dict(zip(names, values))


def np_im2col(x: np.ndarray, kernel, pads, strides, dilations) -> np.ndarray:
    """(N * out positions, C * kh * kw) patches, channel-major; ``pads`` = (top, left, bottom, right)."""
    top, left, bottom, right = pads
    xp = np.pad(np.asarray(x, dtype=np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, _, h, w = xp.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    rows = [
        xp[b, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw].reshape(-1)
        for b in range(n) for i in range(oh) for j in range(ow)
    ]
    return np.stack(rows)


def channel_rows(t: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N * H * W, C) in float64, positions in the order of np_im2col."""
    return np.asarray(t, dtype=np.float64).transpose(0, 2, 3, 1).reshape(-1, t.shape[1])


def family_model() -> onnx.ModelProto:
    """Three families of different sizes: a residual stream fed by stem and conv2 (8 groups),
    conv1's outputs (12) and conv3's (10); the network input and head output are unprunable."""
    b = Builder(seed=1)
    r0 = b.op("Relu", [b.conv("x", 3, 8, name="stem")])
    h = b.op("Relu", [b.conv(r0, 8, 12, name="conv1")])
    s = b.op("Relu", [b.op("Add", [b.conv(h, 12, 8, name="conv2"), r0])])
    t = b.op("Relu", [b.conv(s, 8, 10, name="conv3")])
    y = b.conv(t, 10, 4, name="head")
    return b.model(image(), out(y))


@pytest.fixture(scope="module")
def families() -> tuple[ir.Model, ChannelAnalysis, np.ndarray]:
    model, shapes = normalised(family_model())
    analysis = analyse_channels(model, shapes)
    importance = np.random.default_rng(5).uniform(0.05, 1.0, len(analysis.groups))
    return model, analysis, importance


def family_of(analysis: ChannelAnalysis, group: int) -> tuple[str, ...]:
    return tuple(sorted(analysis.groups[group].producers))


# ---------------------------------------------------------------------------------------------
# 1. family_scores


def test_family_scores_are_keyed_by_producers_and_normalised(families):
    model, analysis, importance = families
    removable = analysis.removable()
    unprunable = [g.index for g in analysis.groups if not g.prunable]
    assert len(removable) == 8 + 12 + 10 and unprunable
    importance = importance.copy()
    importance[unprunable] = 1e6  # must not leak into any family's norm
    scores = family_scores(analysis, importance)
    by_key = {family_of(analysis, int(f[0])): f for f in scores.families}
    assert {k: len(f) for k, f in by_key.items()} == {("conv2", "stem"): 8, ("conv1",): 12, ("conv3",): 10}
    assert sorted(np.concatenate(scores.families).tolist()) == removable  # a partition of the removable groups
    for key, fam in by_key.items():
        assert {family_of(analysis, int(g)) for g in fam} == {key}
        assert np.linalg.norm(scores.scores[fam]) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(scores.scores[fam], importance[fam] / np.linalg.norm(importance[fam]), rtol=1e-12)
        assert np.all(np.diff(scores.scores[fam]) <= 0)  # most important first
    assert np.isnan(scores.scores[unprunable]).all() and np.isfinite(scores.scores[removable]).all()
    np.testing.assert_array_equal(scores.thresholds(), np.unique(scores.scores[removable]))

    # per-family scale does not matter; a family of zero importance scores 0, not NaN
    scaled = importance.copy()
    scaled[by_key[("conv1",)]] *= 1000.0
    scaled[by_key[("conv3",)]] = 0.0
    again = family_scores(analysis, scaled)
    np.testing.assert_allclose(again.scores[by_key[("conv1",)]], scores.scores[by_key[("conv1",)]], rtol=1e-12)
    np.testing.assert_array_equal(again.scores[by_key[("conv3",)]], 0.0)


# ---------------------------------------------------------------------------------------------
# 2. removal_at


@pytest.mark.parametrize("block", [1, 4])
def test_removal_at_threshold_sweep(families, block):
    model, analysis, importance = families
    scores = family_scores(analysis, importance)
    thresholds = np.concatenate([[-np.inf], scores.thresholds(), [np.inf]])
    previous = None
    for t in thresholds:
        removed = removal_at(analysis, scores, t, block)
        assert not removed[[g.index for g in analysis.groups if not g.prunable]].any()
        for fam in scores.families:
            s = scores.scores[fam]
            kept = fam[~removed[fam]]
            k, above = len(kept), int((s >= t).sum())
            assert k >= 1 and (k % block == 0 or k == len(fam)), (t, k, len(fam))
            assert k == align(max(1, above), len(fam), block)
            assert set(fam[s >= t].tolist()) <= set(kept.tolist())  # nothing at or above the threshold goes
            if k < len(fam):  # the lowest-scoring go first
                assert scores.scores[fam[removed[fam]]].max() <= scores.scores[kept].min()
        if previous is not None:
            assert removed.sum() >= previous.sum() and not (previous & ~removed).any()  # monotone, nested
        previous = removed
    assert not removal_at(analysis, scores, scores.thresholds()[0], block).any()
    strongest = removal_at(analysis, scores, np.inf, block)
    assert sorted(int((~strongest[f]).sum()) for f in scores.families) == [block] * 3
    assert analysis.emptied(strongest) == []


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_per_unit_cost_divides_by_the_saving_of_each_group(families, kind):
    _, analysis, importance = families
    scores = family_scores(analysis, importance)
    weighted = per_unit_cost(analysis, scores, kind)
    index = 0 if kind == "params" else 1
    none = np.zeros(len(analysis.groups), dtype=bool)
    saving = {}
    for g in analysis.removable():
        one = none.copy()
        one[g] = True
        saving[g] = analysis.cost(none)[index] - analysis.cost(one)[index]
    groups = list(saving)
    ratio = np.array([weighted.scores[g] / scores.scores[g] for g in groups if scores.scores[g] > 0])
    inverse = np.array([1.0 / saving[g] for g in groups if scores.scores[g] > 0])
    np.testing.assert_allclose(ratio / ratio[0], inverse / inverse[0], rtol=1e-9)  # proportional to 1 / saving
    for family in weighted.families:  # still most important first
        assert (np.diff(weighted.scores[family]) <= 0).all()
    assert np.isnan(weighted.scores[[g for g in range(len(analysis.groups)) if g not in saving]]).all()


def _partial_tensor_model(kind: str) -> onnx.ModelProto:
    """Conv a (8 channels) whose channels 0-1 alone feed Conv p (via Split or Slice), all 8 feed q."""
    b = Builder(seed=2)
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")], name="ra")
    if kind == "split":
        part, _rest = b.op("Split", [a, b.const(np.array([2, 6], dtype=np.int64))], outputs=2, name="part", axis=1)
    else:
        c64 = lambda v: b.const(np.array(v, dtype=np.int64))  # noqa: E731
        part = b.op("Slice", [a, c64([0]), c64([2]), c64([1])], name="part")
    y = b.op("Add", [b.conv(part, 2, 4, name="p"), b.conv(a, 8, 4, name="q")])
    return b.model(image(), out(y))


@pytest.mark.parametrize("kind", ["split", "slice"])
@pytest.mark.parametrize("block", [1, 4])
def test_removal_at_never_empties_a_partial_tensor(kind, block):
    model, shapes = normalised(_partial_tensor_model(kind))
    analysis = analyse_channels(model, shapes)
    fam = [group_of(analysis, "ra.out", c) for c in range(8)]
    assert sorted(analysis.removable()) == sorted(fam)
    importance = np.zeros(len(analysis.groups))
    importance[fam] = [0.2, 0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # channels 0-1 (the partial tensor) score lowest
    scores = family_scores(analysis, importance)
    assert len(scores.families) == 1  # one family although its channels feed different consumers
    assert np.linalg.norm(scores.scores[fam]) == pytest.approx(1.0, abs=1e-12)
    for t in np.append(scores.thresholds(), np.inf):
        removed = removal_at(analysis, scores, t, block)
        assert analysis.emptied(removed) == []
        kept_part = [c for c in (0, 1) if not removed[fam[c]]]
        assert kept_part, (t, removed)
        naive = align(max(1, int((scores.scores[fam] >= t).sum())), 8, block)
        if naive <= 6:  # the family alone would have dropped both: channel 0 (the better) is kept back
            assert kept_part == [0]
            assert int((~removed[fam]).sum()) == naive + 1
    removed = removal_at(analysis, scores, np.inf, block)
    pruned = remove_channels(model, analysis, np.flatnonzero(removed))  # the rewrite accepts it
    kept_in = {n.name: n.inputs[1].const_value.shape[1] for n in pruned.graph if n.op_type == "Conv"}
    assert kept_in["p"] == 1 and kept_in["q"] == block + 1


# ---------------------------------------------------------------------------------------------
# 3. removal_for_budget


@pytest.mark.parametrize("kind", [0, 1])  # params, MACs
@pytest.mark.parametrize("block", [1, 4])
def test_removal_for_budget_is_the_least_removal_meeting_it(families, kind, block):
    model, analysis, importance = families
    scores = family_scores(analysis, importance)
    measure = lambda removed: analysis.cost(removed)[kind]  # noqa: E731
    thresholds = np.append(scores.thresholds(), np.inf)
    measures = np.array([measure(removal_at(analysis, scores, t, block)) for t in thresholds])
    assert np.all(np.diff(measures) <= 0)
    total = measures[0]
    assert total == (count_params(model) if kind == 0 else model_cost(model).macs)
    for fraction in (1.0, 0.9, 0.75, 0.6, 0.45):
        budget = fraction * total
        if measures[-1] > budget:
            assert removal_for_budget(analysis, scores, measure, budget, block) is None
            continue
        removed = removal_for_budget(analysis, scores, measure, budget, block)
        assert removed is not None and measure(removed) <= budget
        first = int(np.flatnonzero(measures <= budget)[0])
        np.testing.assert_array_equal(removed, removal_at(analysis, scores, thresholds[first], block))
        if first > 0:  # one threshold lower is over the budget: nothing removed needlessly
            assert measures[first - 1] > budget
        else:
            assert not removed.any()
    assert removal_for_budget(analysis, scores, measure, measures[-1], block) is not None
    assert removal_for_budget(analysis, scores, measure, measures[-1] - 1, block) is None


# ---------------------------------------------------------------------------------------------
# 4. the input rows and moments the refit is computed from

CONV_GEOMETRY = {
    "symmetric": dict(pads=(1, 1, 1, 1), strides=(1, 1), dilations=(1, 1)),
    "asymmetric": dict(pads=(0, 2, 1, 0), strides=(1, 1), dilations=(1, 1)),
    "stride2": dict(pads=(1, 0, 1, 1), strides=(2, 2), dilations=(1, 1)),
    "dilation2": dict(pads=(2, 1, 2, 2), strides=(1, 2), dilations=(2, 2)),
}


@pytest.mark.parametrize("case", list(CONV_GEOMETRY))
def test_input_rows_are_im2col_of_the_padded_input(case):
    geo = CONV_GEOMETRY[case]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)
    spec = ConsumerInput("conv", "x", 3 * 3 * 2, kernel=(3, 2), **geo)
    rows = _input_rows(spec, torch.from_numpy(x)).numpy()
    expected = np_im2col(x, (3, 2), geo["pads"], geo["strides"], geo["dilations"])
    assert rows.shape == expected.shape
    np.testing.assert_allclose(rows, expected, rtol=0, atol=0)
    # and with the ONNX Conv of the same geometry: rows @ W^T is its output
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    top, left, bottom, right = geo["pads"]
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 2], pads=[top, left, bottom, right],
                            strides=list(geo["strides"]), dilations=list(geo["dilations"]))
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", F, [2, 3, 7, 8])],
                              [helper.make_tensor_value_info("y", F, None)], [numpy_helper.from_array(w, "w")])
    y = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), {"x": x})[0]
    np.testing.assert_allclose(expected @ w.reshape(5, -1).T.astype(np.float64), channel_rows(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID", "explicit"])
def test_consumer_geometry_reproduces_the_conv(auto_pad):
    """refittable_consumers reads pads (auto_pad included), strides and dilations so that the
    rows it implies, times the weight, are the Conv's output on onnxruntime."""
    b = Builder(seed=4)
    a = b.op("Relu", [b.conv("x", 3, 4, name="a")], name="ra")
    w = b.rand(5, 4, 3, 3)
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2])
    attrs.update(dict(pads=[0, 1, 2, 1], dilations=[2, 1]) if auto_pad == "explicit" else dict(auto_pad=auto_pad))
    y = b.op("Conv", [a, w], name="b", **attrs)
    proto = b.model(image(h=8, w=9), out(y))
    model, shapes = normalised(proto)
    analysis = analyse_channels(model, shapes)
    spec = refittable_consumers(model, analysis, shapes)["b"]
    assert spec.tensor == "ra.out" and spec.size == 36 and spec.kernel == (3, 3)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 9)).astype(np.float32)}
    values = intermediates(proto, ["ra.out", y], feeds)
    rows = _input_rows(spec, torch.from_numpy(values["ra.out"])).numpy().astype(np.float64)
    weight = next(i for i in proto.graph.initializer if i.name == w)
    np.testing.assert_allclose(rows @ numpy_helper.to_array(weight).reshape(5, -1).T, channel_rows(values[y]), rtol=1e-5, atol=1e-5)


def test_gemm_rows_are_the_feature_vectors():
    spec = ConsumerInput("fc", "f", 6)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(_input_rows(spec, x).numpy(), x.numpy())
    x3 = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))  # MatMul on (N, T, K)
    np.testing.assert_array_equal(_input_rows(spec, x3).numpy(), x3.numpy().reshape(10, 6))


def test_moments_without_subsampling_are_exact():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((n, 5)) + 0.3 for n in (7, 20, 13)]
    moments = _Moments(max_rows={"layer": 20}, seed=0)
    for c in chunks:
        moments.add("layer", torch.from_numpy(c.astype(np.float32)))
    second, mean = moments.result()["layer"]
    allrows = np.concatenate([c.astype(np.float32).astype(np.float64) for c in chunks])
    np.testing.assert_allclose(second, allrows.T @ allrows / len(allrows), rtol=1e-12)
    np.testing.assert_allclose(mean, allrows.mean(axis=0), rtol=1e-12)


def test_moments_subsample_distinct_rows():
    """Above max_rows a batch contributes max_rows distinct rows (no replacement)."""
    moments = _Moments(max_rows={"layer": 4}, seed=3)
    moments.add("layer", torch.eye(10))
    second, mean = moments.result()["layer"]
    assert np.count_nonzero(np.diag(second)) == 4
    np.testing.assert_allclose(np.diag(second)[np.diag(second) > 0], 0.25)
    np.testing.assert_allclose(second, np.diag(np.diag(second)))
    assert mean.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# 5. refit_consumers on Conv -> Relu -> Conv -> Relu -> Flatten -> Gemm / MatMul


def refit_proto(head: str = "gemm", bias_b: bool = True) -> onnx.ModelProto:
    """x [N, 3, 6, 6] -> Conv a (3->8, 3x3, pad 1) -> Relu -> Conv b (8->6, 3x3, pad 1, stride 2)
    -> Relu -> Flatten (54 features) -> head (5 outputs): Gemm, a Gemm with transB=0, alpha and
    beta, or MatMul + Add."""
    b = Builder(seed=7)
    a = b.op("Relu", [b.conv("x", 3, 8, name="a")], name="ra")
    c = b.op("Relu", [b.conv(a, 8, 6, name="b", stride=2, bias=bias_b)], name="rb")
    flat = b.op("Flatten", [c], name="flat")
    if head == "gemm":
        b.gemm(flat, 54, 5, name="fc")
    elif head == "gemm_alpha":
        b.op("Gemm", [flat, b.rand(54, 5, scale=0.2), b.rand(1, 5)], name="fc", transB=0, alpha=0.5, beta=2.0)
    else:
        b.op("Add", [b.op("MatMul", [flat, b.rand(54, 5, scale=0.2)], name="fc"), b.rand(5)], name="fc_bias")
    return b.model(image(h=6, w=6), out(b.nodes[-1].output[0], ["N", 5]))


class RefitCase:
    """The model, its analysis, calibration data and the moments measure_channel_importance gives."""

    def __init__(self, head: str = "gemm", bias_b: bool = True, samples: int = 160):
        self.proto = refit_proto(head, bias_b)
        self.model, shapes = normalised(self.proto)
        self.proto = ir.to_proto(self.model)
        self.output = self.proto.graph.output[0].name
        self.analysis = analyse_channels(self.model, shapes)
        self.consumers = refittable_consumers(self.model, self.analysis, shapes)
        rng = np.random.default_rng(11)
        self.x = rng.standard_normal((samples, 3, 6, 6)).astype(np.float32)
        batches = [({"x": self.x[i : i + 32]}, None) for i in range(0, samples, 32)]
        sites = [ChannelSite(s.tensor, s.axis, s.groups) for s in self.analysis.sites]
        self.importance = measure_channel_importance(
            OnnxTorchModule(self.proto), sites, len(self.analysis.groups), batches, PassSettings("self", device="cpu", progress=False),
            consumers=list(self.consumers.values()), rows_per_input=10**6)  # all rows: exact moments
        self.a_groups = [group_of(self.analysis, "ra.out", c) for c in range(8)]
        self.b_groups = [group_of(self.analysis, "rb.out", c) for c in range(6)]

    def removed(self, a: list[int] = (), b: list[int] = ()) -> np.ndarray:
        return self.analysis.removed_mask([self.a_groups[c] for c in a] + [self.b_groups[c] for c in b])

    def prune(self, removed: np.ndarray, refit: bool = True) -> tuple[ir.Model, int]:
        pruned = remove_channels(self.model, self.analysis, np.flatnonzero(removed))
        count = refit_consumers(pruned, self.model, self.analysis, removed, self.importance.moments) if refit else 0
        return pruned, count


@functools.cache
def refit_case_for(head: str) -> RefitCase:
    return RefitCase(head)


@pytest.fixture(scope="module")
def refit_case() -> RefitCase:
    return refit_case_for("gemm")


def test_refittable_consumers_and_moments(refit_case):
    case = refit_case
    assert set(case.consumers) == {"b", "fc"}  # a reads the network input
    b, fc = case.consumers["b"], case.consumers["fc"]
    assert (b.tensor, b.size, b.kernel, b.pads, b.strides) == ("ra.out", 72, (3, 3), (1, 1, 1, 1), (2, 2))
    assert (fc.tensor, fc.size, fc.kernel) == ("flat.out", 54, None)
    assert set(case.importance.moments) == {"b", "fc"}
    values = intermediates(case.proto, ["ra.out", "flat.out"], {"x": case.x})
    rows = np_im2col(values["ra.out"], (3, 3), (1, 1, 1, 1), (2, 2), (1, 1))
    for name, feats in (("b", rows), ("fc", values["flat.out"].astype(np.float64))):
        second, mean = case.importance.moments[name]
        np.testing.assert_allclose(second, feats.T @ feats / len(feats), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mean, feats.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_refit_of_nothing_changes_nothing(refit_case):
    case = refit_case
    before = ir.to_proto(case.model).SerializeToString()
    pruned, count = case.prune(case.removed())
    assert count == 0
    proto = ir.to_proto(pruned)
    assert {i.name: numpy_helper.to_array(i).tobytes() for i in proto.graph.initializer} == {
        i.name: numpy_helper.to_array(i).tobytes() for i in case.proto.graph.initializer}
    feeds = {"x": case.x[:8]}
    np.testing.assert_array_equal(run(proto, feeds)[0], run(case.proto, feeds)[0])
    assert ir.to_proto(case.model).SerializeToString() == before


def _check_least_squares(features: np.ndarray, target: np.ndarray, fitted: np.ndarray, plain: np.ndarray,
                         with_constant: bool = True) -> None:
    """``fitted`` is the least-squares fit of ``target`` on ``features`` (and a constant): its
    residual is orthogonal to them, its error is the optimum's and below ``plain``'s."""
    residual = target - fitted
    m = len(features)
    scale = np.abs(features.T @ target / m).max()
    assert np.abs(features.T @ residual / m).max() <= 1e-4 * scale
    design = np.concatenate([features, np.ones((m, 1))], axis=1) if with_constant else features
    if with_constant:
        assert np.abs(residual.mean(axis=0)).max() <= 1e-4 * np.sqrt((target**2).mean())
    optimum = target - design @ np.linalg.lstsq(design, target, rcond=None)[0]
    mse, best, before = (residual**2).mean(), (optimum**2).mean(), ((target - plain) ** 2).mean()
    assert mse == pytest.approx(best, rel=1e-3)
    assert mse < 0.9 * before, (mse, before)


@pytest.mark.parametrize("drop_out", [[], [1, 4]])
def test_refitted_conv_is_the_least_squares_optimum(refit_case, drop_out):
    """Conv b loses input channels of a (and, in the second case, output channels of its own:
    the kept rows are fitted alone, with their own bias)."""
    case = refit_case
    drop = [1, 4, 6]
    removed = case.removed(a=drop, b=drop_out)
    before = ir.to_proto(case.model).SerializeToString()
    pruned, count = case.prune(removed)
    plain, _ = case.prune(removed, refit=False)
    assert count == (2 if drop_out else 1)  # b lost inputs; fc only when b lost outputs
    assert ir.to_proto(case.model).SerializeToString() == before  # the original is not modified
    feeds = {"x": case.x}
    original = intermediates(case.proto, ["ra.out", "b.out"], feeds)
    fitted = intermediates(ir.to_proto(pruned), ["b.out"], feeds)["b.out"]
    unfitted = intermediates(ir.to_proto(plain), ["b.out"], feeds)["b.out"]
    keep = np.isin(np.arange(8), drop, invert=True)
    rows = np_im2col(original["ra.out"], (3, 3), (1, 1, 1, 1), (2, 2), (1, 1))[:, np.repeat(keep, 9)]
    target = channel_rows(original["b.out"])[:, np.isin(np.arange(6), drop_out, invert=True)]
    _check_least_squares(rows, target, channel_rows(fitted), channel_rows(unfitted))


@pytest.mark.parametrize("head", ["gemm", "gemm_alpha", "matmul"])
def test_refitted_head_is_the_least_squares_optimum(head):
    case = refit_case_for(head)
    drop = [0, 3]
    removed = case.removed(b=drop)
    pruned, count = case.prune(removed)
    plain, _ = case.prune(removed, refit=False)
    assert count == 1  # fc lost features (b only lost output rows)
    feeds = {"x": case.x}
    original = intermediates(case.proto, ["flat.out", "fc.out"], feeds)
    keep = np.repeat(np.isin(np.arange(6), drop, invert=True), 9)  # Flatten: 9 features per channel
    features = original["flat.out"].astype(np.float64)[:, keep]
    # the head's own output (before the Add for MatMul): the pruned model feeds it the same features
    fitted = intermediates(ir.to_proto(pruned), ["fc.out"], feeds)["fc.out"].astype(np.float64)
    unfitted = intermediates(ir.to_proto(plain), ["fc.out"], feeds)["fc.out"].astype(np.float64)
    _check_least_squares(features, original["fc.out"].astype(np.float64), fitted, unfitted, with_constant=head != "matmul")


@pytest.mark.parametrize("head", ["gemm", "gemm_alpha", "matmul"])
def test_refitted_model_is_valid_and_costed(head):
    case = refit_case_for(head)
    before = ir.to_proto(case.model).SerializeToString()
    removed = case.removed(a=[0, 2, 5], b=[1, 4])
    pruned, count = case.prune(removed)
    assert count == 2
    proto = ir.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)
    y = run(proto, {"x": case.x[:4]})[0]
    assert y.shape == (4, 5) and np.isfinite(y).all()
    assert (count_params(pruned), model_cost(pruned).macs) == case.analysis.cost(removed)
    assert all(v.uses() for v in pruned.graph.initializers.values())  # no leftover initializers
    weights = {n.name: n.inputs[1].const_value.shape for n in pruned.graph if n.op_type in ("Conv", "Gemm", "MatMul")}
    assert tuple(weights["b"]) == (4, 5, 3, 3) and tuple(weights["fc"]) == ({"gemm": (5, 36), "gemm_alpha": (36, 5), "matmul": (36, 5)}[head])
    assert ir.to_proto(case.model).SerializeToString() == before


def test_refit_of_a_biasless_conv_is_costed():
    case = RefitCase(bias_b=False, samples=64)
    removed = case.removed(a=[0, 2, 5])
    pruned, count = case.prune(removed)
    assert count == 1
    assert count_params(pruned) == case.analysis.cost(removed)[0]


def _sequential(case: RefitCase, removed: np.ndarray) -> ir.Model:
    """``case``'s model without the groups ``removed``, refitted in graph order on all its samples."""
    from onnx_basisprune.pipeline.channel_refit import SequentialRefit

    shapes = infer_shapes(case.model)
    batches = [({"x": case.x[i : i + 40]}, None) for i in range(0, len(case.x), 40)]
    refit = SequentialRefit.of(case.model, find_layers(case.model, shapes), shapes, case.analysis,
                               OnnxTorchModule(case.proto), lambda: iter(batches), device="cpu",
                               rows_per_input=10**6)  # all rows: exact moments
    refits = refit(removed)
    pruned = remove_channels(case.model, case.analysis, np.flatnonzero(removed))
    assert apply_refits(pruned, case.analysis, removed, refits) == len(refits)
    return pruned


@pytest.mark.parametrize("head", ["gemm", "gemm_alpha", "matmul"])
def test_sequential_channel_refit_fits_each_layer_on_the_pruned_inputs(head):
    """Conv b loses input channels of a: refitted on its kept inputs, as the independent refit
    does. The head loses none, but its input changed: it is refitted to the original head's output
    on the features the pruned model produces, which the independent refit leaves alone."""
    case = RefitCase(head, samples=160)
    drop = [1, 4, 6]
    removed = case.removed(a=drop)
    before = ir.to_proto(case.model).SerializeToString()
    pruned = _sequential(case, removed)
    independent, count = case.prune(removed)
    assert count == 1
    proto = ir.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)
    assert (count_params(pruned), model_cost(pruned).macs) == case.analysis.cost(removed)
    assert ir.to_proto(case.model).SerializeToString() == before
    feeds = {"x": case.x}
    original = intermediates(case.proto, ["ra.out", "b.out", "fc.out"], feeds)
    mine = intermediates(proto, ["b.out", "flat.out", "fc.out"], feeds)
    theirs = intermediates(ir.to_proto(independent), ["b.out", "fc.out"], feeds)
    np.testing.assert_allclose(mine["b.out"], theirs["b.out"], rtol=1e-3, atol=1e-4)
    features = mine["flat.out"].astype(np.float64)
    _check_least_squares(features, original["fc.out"].astype(np.float64), mine["fc.out"].astype(np.float64),
                         theirs["fc.out"].astype(np.float64), with_constant=head != "matmul")


def test_sequential_channel_refit_reproduces_the_original_more_closely():
    """Channels of both layers go; the pruned model's output is closer to the original's with the
    refit in graph order than with every layer refitted on its own."""
    case = refit_case_for("gemm")
    removed = case.removed(a=[0, 2, 5], b=[1, 4])
    feeds = {"x": case.x}
    target = run(case.proto, feeds)[0]
    error = {name: float(((run(ir.to_proto(model), feeds)[0] - target) ** 2).mean())
             for name, model in (("sequential", _sequential(case, removed)), ("independent", case.prune(removed)[0]))}
    assert error["sequential"] < error["independent"], error


def test_nothing_removed_refits_nothing(refit_case):
    case = refit_case
    pruned = _sequential(case, case.removed())
    feeds = {"x": case.x[:8]}
    np.testing.assert_array_equal(run(ir.to_proto(pruned), feeds)[0], run(case.proto, feeds)[0])


# ---------------------------------------------------------------------------------------------
# 6. --double end to end on the built-in example

LIMIT = ["--limit", "60"]  # calibration samples for importance: keeps the file within a minute


def _run_double(folder: Path, *extra: str) -> tuple[Path, dict]:
    out, report = folder / "digits.pruned.onnx", folder / "R.json"
    code = main([str(EXAMPLE_MODEL), "--calib", str(EXAMPLE / "calib"), "--eval", str(EXAMPLE / "heldout"), "--no-bench",
                 "--double", *LIMIT, *extra, "-o", str(out), "--report", str(report)])
    assert code == 0
    return out, json.loads(report.read_text())


@pytest.fixture(scope="module")
def double_max_drop(tmp_path_factory):
    return _run_double(tmp_path_factory.mktemp("double"))


@pytest.fixture(scope="module")
def double_params(tmp_path_factory):
    return _run_double(tmp_path_factory.mktemp("double_params"), "--target-params", "0.5")


def _in_out(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[int, int]:
    w = inits[node.input[1]].shape
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return w[1] * attrs.get("group", 1), w[0]
    if node.op_type == "Gemm":
        return (w[1], w[0]) if attrs.get("transB", 0) else (w[0], w[1])
    return w[0], w[1]


def _layer_channels(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Per original layer of a written model: (input channels, output channels), the split pairs
    read from their basis (input) and scaling (output) nodes."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found: dict[str, dict[str, tuple[int, int]]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        found.setdefault(meta.get("basisprune.layer", node.name), {})[meta.get("basisprune.role", "whole")] = _in_out(node, inits)
    return {name: (roles.get("basis", roles.get("whole"))[0], roles.get("scaling", roles.get("whole"))[1])
            for name, roles in found.items()}


def test_double_within_max_drop(double_max_drop):
    from test_main_job import _heldout_accuracy

    out, report = double_max_drop
    q = report["quality"]
    assert q["metric"] == "accuracy" and q["n"] == 540
    assert q["pruned"] >= q["original"] - 0.01
    assert _heldout_accuracy(out) == pytest.approx(q["pruned"], abs=1e-9)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert report["pruned"]["params"] == count_params(ir.serde.deserialize_model(model))


def _check_channel_table(rows: list[dict], original: onnx.ModelProto, written: onnx.ModelProto) -> None:
    """The report's channel table gives each layer's channels in ``original`` and ``written``."""
    table = {row["name"]: row for row in rows}
    before, after = _layer_channels(original), _layer_channels(written)
    assert set(table) == set(after) == set(before)
    for name, row in table.items():
        assert (row["in"][0], row["out"][0]) == before[name], name
        assert (row["in"][1], row["out"][1]) == after[name], name
        assert row["in"][1] <= row["in"][0] and row["out"][1] <= row["out"][0]
    # a layer's kept inputs are its producer's kept outputs along this chain
    names = list(table)
    for prev, nxt in zip(names, names[1:]):
        assert table[nxt]["in"][1] == table[prev]["out"][1], (prev, nxt)


def test_double_channel_table_matches_the_written_model(double_max_drop):
    out, report = double_max_drop
    _check_channel_table(report["channels"], onnx.load(str(EXAMPLE_MODEL)), onnx.load(str(out)))


def test_channel_table_of_a_removal_matches_the_channel_pruned_model():
    """Whichever candidate the search picks, the table of a removal describes the model built
    from it (here one that removes channels)."""
    from onnx_basisprune.api import prepare
    from onnx_basisprune.config import PruneConfig
    from onnx_basisprune.pipeline.calibrated import load_calibration_data
    from onnx_basisprune.pipeline.double import channel_report, channel_stage, channels_for_budget

    prepared = prepare(EXAMPLE_MODEL)
    config = PruneConfig(calib=EXAMPLE / "calib", limit=60, target_params=0.7, progress=False, check_speed=False)
    stage = channel_stage(prepared, load_calibration_data(prepared, config))
    removed = channels_for_budget(stage, "params", 0.7, 1)
    assert removed is not None and removed.any()
    pruned = ir.to_proto(stage.model(removed))
    rows = channel_report(stage.analysis, removed)
    assert any(row["out"][1] < row["out"][0] for row in rows)
    _check_channel_table(rows, onnx.load(str(EXAMPLE_MODEL)), pruned)


def test_double_chooses_the_smallest_candidate(double_max_drop):
    _, report = double_max_drop
    double, original, pruned = report["double"], report["original"], report["pruned"]
    candidates = double["candidates"]
    bases_only = [c for c in candidates if c["share"] is None]
    assert len(bases_only) == 1 and bases_only[0]["channel_groups_removed"] == 0
    assert all(c["channel_groups_removed"] > 0 for c in candidates if c["share"] is not None)
    size = lambda c: 0.5 * (c["params"] / original["params"] + c["macs"] / original["macs"])  # noqa: E731
    chosen = [c for c in candidates if (c["params"], c["macs"]) == (pruned["params"], pruned["macs"])]
    assert chosen and chosen[0]["share"] == double["chosen_share"]
    assert size(chosen[0]) == min(size(c) for c in candidates)
    assert all(c["quality"] >= report["quality"]["original"] - 0.01 for c in candidates)
    assert pruned["params"] <= bases_only[0]["params"]
    assert double["channel_criterion"] == "taylor-sq"


def test_double_meets_a_params_target(double_params):
    out, report = double_params
    assert report["pruned"]["params"] <= 0.5 * report["original"]["params"]
    model = ir.load(str(out))
    assert count_params(model) == report["pruned"]["params"]
    candidates = report["double"]["candidates"]
    assert any(c["share"] is None for c in candidates)
    assert all(c["params"] <= 0.5 * report["original"]["params"] for c in candidates)
    best = max(c["quality"] for c in candidates)
    assert report["quality"]["pruned"] == pytest.approx(best)


def test_double_with_independent_refit(tmp_path):
    """``--fit independent`` refits only the layers that lose inputs, from the original's moments:
    the run completes and says so."""
    out, report = _run_double(tmp_path, "--target-params", "0.5", "--fit", "independent", "--criterion", "energy")
    assert report["calibration"]["fit"] == "independent"
    assert report["pruned"]["params"] <= 0.5 * report["original"]["params"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_double_without_calibration_is_refused(tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "R.json"
    code = main([str(EXAMPLE_MODEL), "--double", "-o", str(out), "--report", str(report)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("onnx-basisprune: error:") and "--double" in err, err
    assert list(tmp_path.iterdir()) == []
