"""Latency-aware decisions: measured break-even ranks and --target-latency, on the built-in example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnx_basisprune import prune
from onnx_basisprune.api import prepare
from onnx_basisprune.plan.plans import use_measured_latency
from onnx_basisprune.cli import main
from onnx_basisprune.plan.ranks import block_size

MODEL = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.onnx"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BASISPRUNE_CACHE", str(tmp_path / "cache"))


def test_measured_break_even_replaces_the_cost_model():
    prepared, table = use_measured_latency(prepare(MODEL), "cpu", block_size("cpu"))
    for name, layer in prepared.splittable().items():
        assert layer.measured_break_even == table.break_even_rank(name)
        assert layer.break_even_rank == table.break_even_rank(name)
        assert 0 <= layer.break_even_rank <= layer.full_rank


def test_break_even_is_the_smallest_over_the_batch_sizes():
    from onnx_basisprune.runtime.latency import measure_latency_table

    prepared = prepare(MODEL)
    measured, first = use_measured_latency(prepared, "cpu", block_size("cpu"), batches=(1, 8))
    assert first.batch == 1
    eight = measure_latency_table(prepared, provider="cpu", block=block_size("cpu"), batch=8)  # cached
    for name, layer in measured.splittable().items():
        assert layer.measured_break_even == min(first.break_even_rank(name), eight.break_even_rank(name))
        assert prepared.layers[name].measured_break_even is None  # a new value; the input is unchanged


def test_target_latency_meets_the_predicted_budget():
    result = prune(MODEL, target_latency=0.9)
    assert result.predicted_latency_ratio <= 0.9
    assert any(layer.action == "decomposed" for layer in result.layers)
    for layer in result.layers:
        if layer.action == "decomposed":
            assert layer.kept_rank <= layer.break_even_rank


def test_cli_target_latency_reports_prediction(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main([str(MODEL), "-o", str(tmp_path / "p.onnx"), "--target-latency", "0.9", "--bench-batch", "1", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "latency ratio on cpu at batch 1: predicted" in out
    data = json.loads(report.read_text())
    assert data["predicted_latency_ratio"] <= 0.9
    assert data["latency"]["cpu"][0]["batch"] == 1
