"""The benchmark suite's --quick mode end to end: one small real case, every method, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_quick_benchmark_writes_results(shared_dir, tmp_path):
    import run_benchmarks

    assert run_benchmarks.main(["--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"{run_benchmarks.QUICK.name}.json").read_text())
    rows = record["rows"]
    original = rows[0]
    assert original["method"] == "original" and 0.85 < original["test_accuracy"] < 0.95 and record["test_n"] == 1000
    methods = {r["method"] for r in rows}
    assert {"basisprune", "energy truncation", "torch-pruning", "onnxsim-l2"} <= methods
    new, old = run_benchmarks._method(*run_benchmarks.NEW), run_benchmarks._method(*run_benchmarks.OLD)
    operating = next(r for r in rows if r["method"] == "basisprune" and r["target"] == "max-drop 1" and r["criterion"] == new)
    assert operating["params"] < original["params"] and operating["test_accuracy"] is not None
    size_first = next(r for r in rows if r["target"] == "max-drop 1, --no-latency-aware --no-bench")
    assert size_first["criterion"] == new and size_first["test_accuracy"] is not None
    for f in run_benchmarks.QUICK.sweep:  # both methods at every budget
        assert {r["criterion"] for r in rows if r["method"] == "basisprune" and r["target"] == f"macs {f:g}"} >= {new, old}
    for r in rows:
        if r["params"]:
            assert r["test_accuracy"] is not None and 0.0 <= r["test_accuracy"] <= 1.0
            assert set(r["latency"]) == {"b1", "b8"} and all(v > 0 for v in r["latency"].values())
            path = run_benchmarks.ROOT / r["path"]  # recorded relative to the repository
            assert not Path(r["path"]).is_absolute() and path.is_file() and r["file_bytes"] == path.stat().st_size
    for r in rows:  # baselines land on the MACs they were asked for
        if r["method"] in run_benchmarks.BASELINES and r["params"]:
            assert r["macs"] / original["macs"] == pytest.approx(float(r["target"].split()[1]), abs=0.011)
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert run_benchmarks.QUICK.title in markdown and "--max-drop 1" in markdown
    assert (tmp_path / f"{run_benchmarks.QUICK.name}.png").stat().st_size > 10_000


def test_results_keep_the_transfer_records_of_models_built_elsewhere(tmp_path, monkeypatch):
    import run_benchmarks

    models, out = tmp_path / "models", tmp_path / "results"
    models.mkdir(), out.mkdir()
    (models / run_benchmarks.TRANSFER_JSON).write_text(json.dumps({"b": {"built": "here"}}))
    (out / run_benchmarks.TRANSFER_JSON).write_text(json.dumps({"a": {"built": "elsewhere"}, "b": {"built": "before"}}))
    monkeypatch.setattr(run_benchmarks, "MODELS", models)
    monkeypatch.setattr(run_benchmarks, "transfer_markdown", lambda record: [])  # the table is not under test
    run_benchmarks.write_results(out, out / "RESULTS.md")
    assert json.loads((out / run_benchmarks.TRANSFER_JSON).read_text()) == {"a": {"built": "elsewhere"},
                                                                             "b": {"built": "here"}}


def test_cost_model_fit_recovers_known_constants():
    """The fit behind benchmarks/cost_model.py: timings made from a known time per MAC, node
    overhead and traffic per element give those constants back, in MACs."""
    import cost_model

    rng = np.random.default_rng(0)
    per_mac, node_ms, per_element = 2e-9, 0.004, 6e-8  # overhead 2e6 MACs, traffic 30 MACs/element
    points = []
    for i in range(60):
        delta, inter, node = -rng.uniform(1e5, 5e6), rng.uniform(1e3, 1e5), rng.uniform(0.01, 1.0)
        extra = per_mac * delta + node_ms + per_element * inter
        points.append(cost_model.Point("m", f"l{i}", 8, extra, node, delta, inter))
    fitted = cost_model.fit(points)
    assert fitted["node_overhead_macs"] == pytest.approx(2e6, rel=1e-6)
    assert fitted["intermediate_macs_per_element"] == pytest.approx(30, rel=1e-6)
