"""The comparison baselines of benchmarks/baselines.py (Torch-Pruning Taylor, onnxsim structured
L2 / Wanda) on the real ResNet-20 / CIFAR-10 of ../shared, with a handful of images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ROOT, run, shared_model

pytest.importorskip("torch_pruning", reason="the bench extra (torch-pruning) is not installed")
pytest.importorskip("onnxsim", reason="the bench extra (onnxsim) is not installed")

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import baselines as B  # noqa: E402

CALIB_N = 40  # class-balanced CIFAR-10 train images for importance
TEST_N = 100  # class-balanced CIFAR-10 test images for accuracy
TARGET = 0.6  # MACs kept


@pytest.fixture(scope="module")
def case(shared_dir: Path) -> dict:
    model = shared_model(shared_dir, "resnet20_cifar10.onnx")
    calib, test = shared_dir / "data/cifar10/train", shared_dir / "data/cifar10/test"
    if not calib.is_dir() or not test.is_dir():
        pytest.skip(f"CIFAR-10 not present under {shared_dir / 'data'}")
    return {"model": model, "calib": calib, "test": test}


def conv_out_channels(path: str | Path) -> list[int]:
    m = onnx.load(str(path))
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    return [inits[n.input[1]][0] for n in m.graph.node if n.op_type == "Conv"]


def check_model(result: B.BaselineResult, original: Path) -> np.ndarray:
    """The produced file is a valid, runnable model with a dynamic batch whose params/MACs are
    what the result says (also by onnx_basisprune.api.prepare) and which really is smaller."""
    from onnx_basisprune.api import prepare

    path = Path(result.model_path)
    onnx.checker.check_model(str(path), full_check=True)
    assert B.model_cost(path) == (result.params, result.macs)
    cost = prepare(str(path)).original
    assert (cost.params, cost.macs) == (result.params, result.macs)
    assert result.file_bytes == path.stat().st_size
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (logits,) = run(path, {"input": x})
    assert logits.shape == (3, 10) and np.isfinite(logits).all()
    assert sum(conv_out_channels(path)) < sum(conv_out_channels(original))
    return logits


def test_cost_matches_prepare(case):
    from onnx_basisprune.api import prepare

    cost = prepare(str(case["model"])).original
    assert B.model_cost(case["model"]) == (cost.params, cost.macs) == (269083, 40551040)


def test_lift_constants_keeps_function_and_params(case):
    original = onnx.load(str(case["model"]))
    lifted = B.lift_constants(original)
    assert not any(n.op_type == "Constant" for n in lifted.graph.node)
    assert any(n.op_type == "Constant" for n in original.graph.node)
    assert B.model_cost(lifted) == B.model_cost(original)
    x = {"input": np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_array_equal(run(lifted, x)[0], run(original, x)[0])


def test_rebuilt_resnet_matches_onnxruntime(case):
    net = B.cifar_resnet_from_onnx(case["model"])
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 19
    assert sum(isinstance(m, B.ShortcutA) for m in net.modules()) == 2
    data = B.load_folder(case["model"], case["test"], limit=20)
    assert B.verify_torch_model(net, case["model"], data, n=20) <= 1e-4
    # the check does catch a wrong model: one perturbed conv bias breaks it
    net.layer2[0].conv1.bias.data += 0.5
    with pytest.raises(B.BaselineError, match="max rel. error"):
        B.verify_torch_model(net, case["model"], data, n=20)


def test_shortcut_pruner_keeps_the_function():
    """Pruning ShortcutA's inputs/outputs = dropping those channels of the unpruned output,
    with outputs whose input was removed reading zero."""
    pruner = B._shortcut_pruner()
    layer = B.ShortcutA(4, 8)
    x = torch.randn(2, 4, 6, 6)
    full = layer(x)  # channels 2..5 carry inputs 0..3, the rest are zero
    assert torch.equal(full[:, 2:6], x[:, :, ::2, ::2]) and not full[:, [0, 1, 6, 7]].any()
    pruner.prune_in_channels(layer, [1])
    pruner.prune_out_channels(layer, [0, 4])
    expected = full[:, [1, 2, 3, 5, 6, 7]].clone()
    expected[:, 2] = 0  # was output 3 <- input 1, now removed
    assert layer.in_channels == 3 and layer.out_channels == 6
    assert torch.equal(layer(x[:, [0, 2, 3]]), expected)


@pytest.fixture(scope="module")
def taylor(case, tmp_path_factory) -> B.BaselineResult:
    return B.torch_pruning_taylor(case["model"], case["calib"], case["test"], "macs", TARGET, limit=CALIB_N,
                                  test_limit=TEST_N, out_dir=tmp_path_factory.mktemp("tp"), max_steps=12,
                                  progress=False)


def test_torch_pruning_taylor_hits_target(taylor, case):
    assert taylor.method == "torch-pruning" and taylor.reached, taylor.note
    assert abs(taylor.macs_fraction - TARGET) <= B.TOLERANCE
    assert (taylor.original_params, taylor.original_macs) == B.model_cost(case["model"])
    assert 0 < taylor.setting["pruning_ratio"] < 0.95
    assert taylor.extra["calib_n"] == CALIB_N
    assert taylor.extra["torch_vs_onnx_rel_error"] <= 1e-4 and taylor.extra["export_rel_error"] <= 1e-4
    assert taylor.test_n == TEST_N and 0.0 <= taylor.test_accuracy <= 1.0
    check_model(taylor, case["model"])
    # the residual stream was pruned too, not just the inner channels (the custom shortcut pruner)
    channels = conv_out_channels(taylor.model_path)
    original = conv_out_channels(case["model"])
    stream = [i for i in range(2, 19, 2)]  # conv2 of every block writes the residual stream
    assert any(channels[i] < original[i] for i in stream)


def test_torch_pruning_round_to_keeps_channel_counts_on_the_block(case, tmp_path):
    """``torch-pruning-round``: Torch-Pruning's round_to, so channel counts stay multiples of the
    provider's block (the fair latency baseline)."""
    (result,) = B.torch_pruning_taylor_sweep(case["model"], case["calib"], None, "macs", [TARGET], limit=CALIB_N,
                                             out_dir=tmp_path, max_steps=8, round_to=8, progress=False)
    assert result.method == "torch-pruning-round" and result.setting["round_to"] == 8
    channels = conv_out_channels(result.model_path)
    assert channels != conv_out_channels(case["model"]) and all(c % 8 == 0 for c in channels)


@pytest.fixture(scope="module")
def onnxsim_results(case, tmp_path_factory) -> dict[str, B.BaselineResult]:
    out = tmp_path_factory.mktemp("onnxsim")
    return {m: B.onnxsim_structured(case["model"], case["calib"], case["test"], "macs", TARGET, method=m,
                                    limit=CALIB_N, test_limit=TEST_N, out_dir=out, progress=False)
            for m in ("l2", "wanda")}


@pytest.mark.parametrize("method", ["l2", "wanda"])
def test_onnxsim_hits_target(onnxsim_results, case, method):
    result = onnxsim_results[method]
    assert result.method == f"onnxsim-{method}" and result.reached, result.note
    assert abs(result.macs_fraction - TARGET) <= B.TOLERANCE
    assert 0 < result.setting["sparsity"] < 0.999
    assert result.test_n == TEST_N and 0.0 <= result.test_accuracy <= 1.0
    check_model(result, case["model"])


def test_onnxsim_wanda_uses_the_calibration(onnxsim_results):
    """Same sparsity, same channel counts as L2, but other channels chosen by the activations."""
    l2, wanda = onnxsim_results["l2"], onnxsim_results["wanda"]
    assert wanda.extra["calib_n"] == CALIB_N
    assert wanda.setting["sparsity"] == l2.setting["sparsity"] and (wanda.params, wanda.macs) == (l2.params, l2.macs)
    a, b = onnx.load(l2.model_path), onnx.load(wanda.model_path)
    weights = lambda m: [onnx.numpy_helper.to_array(t) for t in m.graph.initializer]  # noqa: E731
    assert any(not np.array_equal(x, y) for x, y in zip(weights(a), weights(b)))


def test_onnxsim_out_of_reach_is_reported(case, tmp_path):
    # ResNet-20's residual stream is not cut by onnxsim (option-A shortcut): 1 % of the MACs is out of reach
    result = B.onnxsim_structured(case["model"], None, None, "macs", 0.01, method="l2", out_dir=tmp_path,
                                  progress=False)
    assert not result.reached and "out of reach" in result.note
    assert result.macs_fraction > 0.02 and result.test_accuracy is None
    assert Path(result.model_path).is_file()


def test_cli_params_target_and_json(case, tmp_path):
    out = tmp_path / "r.json"
    code = B.main(["--model", str(case["model"]), "--calib", str(case["calib"]), "--test", str(case["test"]),
                   "--target-params", "0.7", "--methods", "onnxsim-l2", "--limit", "20", "--test-limit", "50",
                   "--out-dir", str(tmp_path), "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["original"]["params"] == 269083 and data["original"]["test_n"] == 50
    (row,) = data["results"]
    assert row["method"] == "onnxsim-l2" and row["target_kind"] == "params" and row["reached"]
    assert abs(row["params_fraction"] - 0.7) <= B.TOLERANCE
    assert B.model_cost(row["model_path"]) == (row["params"], row["macs"])


def test_bisect_lands_and_reports_unreachable():
    def f(x):
        return 1.0 - 0.8 * x, None
    best, trace, ok = B._bisect(f, 0.5, 0.0, 1.0, 0.001, 30)
    assert ok and abs(best.fraction - 0.5) <= 0.001 and len(trace) < 30
    best, _, ok = B._bisect(f, 0.1, 0.0, 1.0, 0.001, 30)
    assert not ok and best.x == 1.0


def test_bisect_finds_the_target_below_a_curve_that_turns_back_up():
    def f(x):  # keeps 1 - 0.8 x up to x = 0.8, then nothing pruned (Torch-Pruning's round_to at high ratios)
        return (1.0 - 0.8 * x if x <= 0.8 else 1.0), None
    best, trace, ok = B._bisect(f, 0.5, 0.0, 1.0, 0.001, 30)
    assert ok and abs(best.fraction - 0.5) <= 0.001 and trace[0] == (1.0, 1.0)
    best, _, ok = B._bisect(f, 0.2, 0.0, 1.0, 0.001, 30)
    assert not ok and abs(best.fraction - 0.36) < 1e-9
