"""The final speed check: a model is handed over as faster only when it measured faster, and the
split layers that save least are recomposed until it is (where the target allows)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnx_basisprune.runtime import speed_check
from onnx_basisprune.basis.rewrite import Decision
from onnx_basisprune.runtime.speed_check import check_speed, measured_faster


def _rows(*ratios: float) -> list[dict]:
    return [{"batch": b, "threads": 2, "original_ms": 1.0, "pruned_ms": r, "ratio": r, "ratio_ci": [r - 0.02, r + 0.02]}
            for b, r in zip((1, 8), ratios)]


def test_faster_means_the_whole_interval_below_one():
    assert measured_faster(_rows(0.9, 0.95))
    assert not measured_faster(_rows(0.9, 0.99))  # interval reaches 1.01 at batch 8
    assert not measured_faster(_rows(1.2, 0.5))


@pytest.fixture
def timed(monkeypatch):
    """time_against answers from a script; the models built are recorded by their decisions."""
    answers: list[list[dict]] = []
    built: list[dict] = []

    def fake(original, pruned, provider, batches, shapes):
        return answers.pop(0), {"cpu": "test"}

    monkeypatch.setattr(speed_check, "time_against", fake)

    def build(decisions):
        built.append(dict(decisions))
        return ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)

    return answers, built, build


def _decisions() -> dict[str, Decision]:
    keep = np.arange(4)[None]
    return {"a": Decision("decomposed", "", keep), "b": Decision("decomposed", "", keep), "c": Decision("kept", ""),
            "d": Decision("decomposed", "", keep), "e": Decision("decomposed", "", keep)}


def test_recomposes_the_layers_that_save_least_until_faster(timed):
    answers, built, build = timed
    answers += [_rows(1.03, 1.0), _rows(0.97, 0.99), _rows(0.9, 0.92)]
    savings = {"a": 5.0, "b": 0.1, "d": 2.0, "e": -1.0}
    decisions, _, check = check_speed(None, _decisions(), build, savings, "cpu", (1, 8), None, may_recompose=True,
                                      progress=False)
    assert check.faster and check.retimed == 2
    assert check.recomposed == ("e", "b")  # least saving first, a quarter of those left each time
    assert [decisions[n].action for n in "abcde"] == ["decomposed", "recomposed", "kept", "decomposed", "recomposed"]
    assert decisions["e"].keep is not None  # recomposed at its rank: the same function
    assert len(built) == 3 and check.latency == _rows(0.9, 0.92)


def test_a_size_budget_is_reported_not_changed(timed):
    answers, built, build = timed
    answers.append(_rows(1.05, 1.01))
    decisions, _, check = check_speed(None, _decisions(), build, {}, "cpu", (1, 8), None, may_recompose=False,
                                      progress=False)
    assert not check.faster and check.recomposed == ()
    assert {n: d.action for n, d in decisions.items()} == {n: d.action for n, d in _decisions().items()}
    assert "NOT faster" in check.describe()
    assert check.to_json()["faster"] is False


def test_recomposing_that_does_not_help_is_undone_and_said(timed):
    """On a noisy machine (or with savings too small to measure) recomposing every layer would only
    give the size back: the pruned model stays, reported as not faster."""
    answers, built, build = timed
    answers += [_rows(1.0, 0.99)] + [_rows(1.1, 1.1)] * 4
    decisions, model, check = check_speed(None, _decisions(), build, {}, "cpu", (1, 8), None, may_recompose=True,
                                          progress=False)
    assert not check.faster and check.recomposed == () and check.tried == 4 and check.retimed == 4
    assert all(decisions[n].action == "decomposed" for n in "abde") and model is not None
    assert check.latency == _rows(1.0, 0.99)  # the timing of the model handed over
    assert "did not make it faster either" in check.describe() and check.to_json()["tried_and_undone"] == 4
