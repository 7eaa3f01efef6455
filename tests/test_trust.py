"""What a quality promise can be trusted with: the paired drop bound behind ``--max-drop``, labels
that are not the model's classes (dropped, or refused), and the held-out set's own limits."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import EXAMPLE_MODEL, make_model, shared_model
from onnx import TensorProto, helper

from onnx_basisprune.api import prepare
from onnx_basisprune.pipeline.calibrated import load_calibration_data
from onnx_basisprune.cli import build_parser, config_from_args, main
from onnx_basisprune.io.cost import ModelCost
from onnx_basisprune.pipeline.prepared import PruneResult
from onnx_basisprune.errors import BasisPruneError
from onnx_basisprune.report.tables import markdown_report, summary_table
from onnx_basisprune.plan.search import (
    CONFIDENCE,
    Evaluator,
    Quality,
    QualitySummary,
    chance_problem,
    describe_change,
    drop_bound,
    images_to_certify,
    max_drop_search,
)

EXAMPLE = EXAMPLE_MODEL.parent
Z2 = 1.6448536269514722**2  # one-sided 95% normal quantile, squared
PREFIX = "onnx-basisprune: error:"

# ---------------------------------------------------------------------------------------------
# 1. The bound


def test_zero_discordant_pairs_still_bound_the_drop_above_zero():
    for n in (10, 73, 540):
        estimate, bound = drop_bound(0, 0, n)
        assert estimate == 0.0
        assert bound == pytest.approx(Z2 / (n + Z2), rel=1e-9)  # Wilson's bound for 0 events


def test_bound_grows_with_losses_and_shrinks_with_images():
    assert drop_bound(3, 1, 200)[0] == pytest.approx(2 / 200)
    bounds = [drop_bound(lost, 0, 300)[1] for lost in range(6)]
    assert bounds == sorted(bounds) and len(set(bounds)) == 6
    by_n = [drop_bound(2, 0, n)[1] for n in (50, 100, 400, 1600)]
    assert by_n == sorted(by_n, reverse=True)
    assert drop_bound(2, 2, 300)[1] > drop_bound(0, 0, 300)[1]  # same estimate, more uncertainty
    assert drop_bound(0, 12, 200)[1] < 0  # a candidate that clearly gains certifies a gain
    assert drop_bound(40, 0, 40) == (1.0, 1.0)


def test_bound_covers_the_true_drop_at_its_confidence():
    rng = np.random.default_rng(0)
    for p_lost, p_gained, n in ((0.01, 0.005, 500), (0.05, 0.05, 300), (0.1, 0.02, 100)):
        counts = rng.multinomial(n, [p_lost, p_gained, 1 - p_lost - p_gained], size=1500)
        covered = [drop_bound(int(b), int(c), n)[1] >= p_lost - p_gained for b, c, _ in counts]
        assert np.mean(covered) >= CONFIDENCE - 0.015, (p_lost, p_gained, n)


@pytest.mark.parametrize("lost, gained, n", [(-1, 0, 10), (0, 0, 0), (6, 5, 10)])
def test_bound_refuses_impossible_counts(lost, gained, n):
    with pytest.raises(ValueError):
        drop_bound(lost, gained, n)


def test_images_to_certify_is_the_smallest_set_that_does():
    for max_drop, lost in ((1.0, 0), (1.0, 1), (3.0, 1), (0.5, 2)):
        n = images_to_certify(max_drop, lost)
        assert 100 * drop_bound(lost, 0, n)[1] <= max_drop < 100 * drop_bound(lost, 0, n - 1)[1]
    assert (images_to_certify(1.0, 0), images_to_certify(1.0, 1)) == (268, 446)
    assert images_to_certify(0.0, 1) is None


def test_change_is_reported_with_its_worst_case():
    assert describe_change(0.4, 1.02) == "-0.40 pt, 95% bound -1.02"
    assert describe_change(0.0, 0.5) == "+0.00 pt, 95% bound -0.50"


def test_search_passes_on_the_bound_not_the_estimate():
    bounds = [0.5, 0.9, 1.2, 1.5]  # every estimate is 0.5 pt, within the budget of 1
    threshold, sweep = max_drop_search(
        np.arange(4.0), lambda t: int(t), lambda i: i, lambda i: Quality(0.9, 0.5, bounds[i]), lambda i: (10 - i, 10 - i),
        max_drop=1.0,
    )
    assert threshold == 1.0
    assert {(p.threshold, p.drop, p.drop_bound, p.passed) for p in sweep} >= {(1.0, 0.5, 0.9, True), (2.0, 0.5, 1.2, False)}


# ---------------------------------------------------------------------------------------------
# 2. Chance level and the evaluator's paired outcomes


def test_chance_level_is_the_most_frequent_label():
    labels = np.repeat(np.arange(10), 20)
    assert chance_problem(labels, labels) is None
    assert "at chance level (0.1000" in chance_problem((labels + 1) % 10, labels)
    rigged = labels.copy()
    rigged[:30] = 3  # 25% of one class: answering 3 every time is chance
    assert chance_problem(np.full_like(rigged, 3), rigged) is not None
    near = (labels + 1) % 10
    near[:24] = labels[:24]  # 12% right: within chance's noise on 200 images
    assert chance_problem(near, labels) is not None


def _argmax_model(weight: np.ndarray) -> ir.Model:
    """``y = x @ weight`` on x [N, 3]: with the identity, the top-1 class is the argmax of x."""
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", TensorProto.FLOAT, ["N", 3])],
                       [("y", TensorProto.FLOAT, ["N", 3])], [helper.make_tensor("w", TensorProto.FLOAT, [3, 3], weight.ravel())])
    return ir.serde.deserialize_model(proto)


def _feeds(seed: int = 0, n: int = 300) -> tuple[np.ndarray, Callable]:
    x = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
    return x, lambda: (({"x": x[i:i + 64]}, None) for i in range(0, n, 64))


def test_evaluator_measures_paired_outcomes_against_the_original():
    x, batches = _feeds()
    truth = x.argmax(1)
    labels = truth.copy()
    labels[:40] = (truth[:40] + 1) % 3  # the original is wrong on 40 images
    evaluator = Evaluator(batches, labels, _argmax_model(np.eye(3, dtype=np.float32)))
    assert evaluator.metric == "accuracy" and evaluator.original == pytest.approx(260 / 300)
    swapped = _argmax_model(np.eye(3, dtype=np.float32)[[1, 0, 2]])  # answers 1 for 0 and 0 for 1
    candidate = np.array([1, 0, 2])[truth]
    lost = int(((truth == labels) & (candidate != labels)).sum())
    gained = int(((truth != labels) & (candidate == labels)).sum())
    q = evaluator.measure(swapped)
    assert q.value == pytest.approx((candidate == labels).mean())
    assert (q.drop, q.drop_bound) == pytest.approx(tuple(100 * v for v in drop_bound(lost, gained, 300)))
    summary = evaluator.summary(swapped)
    assert summary.drop == q.drop and summary.drop_bound == q.drop_bound and summary.confidence == CONFIDENCE
    assert evaluator.bound_floor == pytest.approx(100 * Z2 / (300 + Z2))


def test_evaluator_refuses_a_reference_at_chance_level():
    x, batches = _feeds()
    with pytest.raises(BasisPruneError, match="chance level") as info:
        Evaluator(batches, (x.argmax(1) + 1) % 3, _argmax_model(np.eye(3, dtype=np.float32)))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 3. The main job's data: which labels count, and what the held-out set can promise


def _copy_images(pairs: list[tuple[Path, Path]]) -> None:
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _digit_images(split: str, per_class: int) -> list[tuple[int, Path]]:
    return [(k, png) for k in range(10) for png in sorted((EXAMPLE / split / str(k)).glob("*.png"))[:per_class]]


def _load(capsys, *argv: str):
    args = build_parser().parse_args([str(EXAMPLE_MODEL), *map(str, argv)])
    data = load_calibration_data(prepare(EXAMPLE_MODEL), config_from_args(args))
    return data, capsys.readouterr().out


def test_folders_that_cannot_be_the_model_outputs_are_unlabeled(tmp_path, capsys):
    root = tmp_path / "domain"  # two domain classes for a 10-class model
    _copy_images([(png, root / ("low" if k < 5 else "high") / f"{k}_{png.name}") for k, png in _digit_images("calib", 12)])
    data, out = _load(capsys, "--calib", root, "--target-params", "0.5")
    assert data.evaluator.metric == "agreement" and data.evaluator.original == 1.0
    assert data.loss == "self" and data.calib.labels is None
    assert "unlabeled: 2 class folders, the model has 10 outputs and no --labels maps them" in out


def test_folders_at_chance_are_unlabeled(tmp_path, capsys):
    root = tmp_path / "shifted"  # ten folders, but sorted order maps digit k to folder k+1
    _copy_images([(png, root / f"c{(k + 1) % 10}" / png.name) for k, png in _digit_images("calib", 12)])
    data, out = _load(capsys, "--calib", root, "--target-params", "0.5")
    assert data.evaluator.metric == "agreement" and data.loss == "self"
    assert "unlabeled: the original model's accuracy with these labels" in out and "at chance level" in out


def test_the_model_classes_stay_labeled(capsys):
    data, out = _load(capsys, "--calib", EXAMPLE / "calib", "--eval", EXAMPLE / "heldout", "--target-params", "0.5")
    assert data.evaluator.metric == "accuracy" and data.loss == "labels"
    assert "unlabeled" not in out and "warning" not in out


def test_unlabeled_flag_forces_agreement(capsys):
    data, out = _load(capsys, "--calib", EXAMPLE / "calib", "--eval", EXAMPLE / "heldout", "--unlabeled", "--target-params", "0.5")
    assert data.evaluator.metric == "agreement" and data.loss == "self"
    assert "unlabeled: --unlabeled" in out


def test_a_labels_file_at_chance_is_an_error(tmp_path, capsys):
    mapping = tmp_path / "labels.json"
    mapping.write_text(json.dumps({str(k): (k + 1) % 10 for k in range(10)}))
    out = tmp_path / "out.onnx"
    code = main([str(EXAMPLE_MODEL), "--calib", str(EXAMPLE / "calib"), "--labels", str(mapping), "--target-params", "0.5",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and err.startswith(PREFIX) and "chance level" in err and "--labels" in err, err


def test_unlabeled_needs_calibration_data(tmp_path, capsys):
    assert main([str(EXAMPLE_MODEL), "--unlabeled", "-o", str(tmp_path / "out.onnx")]) == 2
    assert "--unlabeled" in capsys.readouterr().err


def test_training_images_held_out_draw_a_warning(capsys):
    data, out = _load(capsys, "--calib", EXAMPLE / "calib", "--target-params", "0.5")  # the example was trained on calib/
    assert data.evaluator.original >= 0.99
    assert "warning: the original model scores 1.0000 accuracy on the held-out part of --calib" in out and "--eval" in out


def test_a_held_out_set_too_small_to_certify_is_refused(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main([str(EXAMPLE_MODEL), "--calib", str(EXAMPLE / "calib"), "-o", str(out)])  # 120 held out, --max-drop 1
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and err.startswith(PREFIX), err
    assert "120 held-out images cannot certify --max-drop 1" in err and "268 images, 446 to allow one lost image" in err


def test_a_held_out_set_that_certifies_only_unchanged_candidates_is_noted(tmp_path, capsys):
    heldout = tmp_path / "heldout"
    _copy_images([(png, heldout / str(k) / png.name) for k, png in _digit_images("heldout", 30)])  # 300 images
    data, out = _load(capsys, "--calib", EXAMPLE / "calib", "--eval", heldout)
    assert data.evaluator.n == 300
    assert "note: 300 held-out images certify --max-drop 1 only for candidates that lose no image" in out
    assert "446 images would allow one" in out


def test_the_report_shows_the_drop_and_its_bound():
    quality = QualitySummary("accuracy", 0.95, 0.946, 540, 0.4, 1.02, CONFIDENCE)
    result = PruneResult(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), ModelCost(100, 1000), ModelCost(50, 600), [],
                         quality=quality)
    assert "-0.40 pt, 95% bound -1.02" in summary_table(result)
    assert "| -0.40 pt, 95% bound -1.02 |" in markdown_report(result.to_json())


# ---------------------------------------------------------------------------------------------
# 4. The case from the issue: an ImageNet model with a two-class domain folder


def test_imagenet_model_on_ants_and_bees_is_judged_by_agreement(shared_dir, capsys):
    model = shared_model(shared_dir, "efficientnet_lite0_imagenet.onnx")
    calib = shared_dir / "data" / "hymenoptera" / "train"
    if not calib.is_dir():
        pytest.skip(f"{calib} not present")
    args = build_parser().parse_args([str(model), "--calib", str(calib), "--limit", "40", "--target-params", "0.5"])
    data = load_calibration_data(prepare(model), config_from_args(args))
    out = capsys.readouterr().out
    assert "unlabeled: 2 class folders, the model has 1000 outputs and no --labels maps them" in out
    assert data.evaluator.metric == "agreement" and data.evaluator.original == 1.0 and data.loss == "self"


def test_one_bisection_serves_budgets_and_searches():
    from onnx_basisprune.plan.bisection import first_fitting, last_passing

    calls: list[int] = []
    for k in range(11):
        assert first_fitting(10, lambda i, k=k: calls.append(i) or i >= k) == k
    assert first_fitting(10, lambda i: False) is None
    assert len(calls) <= 11 * 6  # logarithmic, not a scan
    assert [last_passing(0, 10, lambda i, k=k: i <= k) for k in range(10)] == list(range(10))
