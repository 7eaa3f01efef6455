"""Tests of onnx_basisprune.runtime.bench: structure, statistics, input handling, CLI (CPU), CUDA path (GPU only)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_basisprune.runtime import bench
from onnx_basisprune.cli import bench_parser, main
from onnx_basisprune.runtime.bench import (
    BenchConfig,
    BenchResult,
    benchmark,
    format_bench,
)
from onnx_basisprune.runtime.session import available_providers, make_runner, new_session

FAST = BenchConfig(batches=(1, 2), threads=1, warmup=2, rounds=5)


def conv_model(channels: int, shape: Sequence[int | str] = ("N", 3, 8, 8), name: str | None = None) -> onnx.ModelProto:
    """x -> Conv(3 -> channels, 3x3, same padding) -> Relu -> y."""
    weight = np.random.default_rng(channels).standard_normal((channels, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        name or f"conv{channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def small_big_result() -> BenchResult:
    return benchmark([conv_model(4), conv_model(16)], FAST)


def test_structure_ratio_and_ci(small_big_result: BenchResult) -> None:
    result = small_big_result
    assert [(c.provider, c.batch, c.threads) for c in result.cases] == [("cpu", 1, 1), ("cpu", 2, 1)]
    for case in result.cases:
        assert case.input_shapes == {"x": [case.batch, 3, 8, 8]}
        first, second = case.timings
        assert (first.model, second.model) == ("conv4", "conv16")
        assert first.ratio is None and first.ratio_ci is None
        for timing in case.timings:
            assert 0 < timing.min_ms <= timing.median_ms <= timing.p90_ms
        low, high = second.ratio_ci
        assert 0 < low <= second.ratio <= high
        assert any("coverage" in w for w in case.warnings)  # 5 rounds cannot give a 95% interval


def test_environment_records_dependencies(small_big_result: BenchResult) -> None:
    env = small_big_result.environment
    for key in ("onnxruntime", "cpu", "threads", "date", "providers", "graph_optimization_level", "ratio_ci"):
        assert env[key], key
    assert env["threads"] == "1"
    assert "gpu" not in env


def test_models_run_alternately() -> None:
    calls: list[str] = []
    runners = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = bench.time_alternating(runners, warmup=1, rounds=3)
    assert calls == ["a", "b"] * 4
    assert [len(t) for t in times] == [3, 3]


def test_min_time_adds_rounds_up_to_ten_times() -> None:
    ticks = iter(range(10_000))

    def clock() -> float:  # every run lasts exactly one second
        return float(next(ticks))

    noop = [lambda: None, lambda: None]
    assert len(bench.time_alternating(noop, 0, rounds=2, min_time_s=5, clock=clock)[0]) == 5
    assert len(bench.time_alternating(noop, 0, rounds=2, min_time_s=1e9, clock=clock)[0]) == 20


def test_order_statistics_interval_for_the_median() -> None:
    assert bench._median_ci_ranks(100) == (40, 61)  # textbook ranks for n = 100
    assert bench._median_ci_ranks(5) == (1, 5)
    assert bench._ci_coverage(100) >= 0.95 > bench._ci_coverage(5)
    assert bench._median_ci([float(v) for v in range(1, 101)]) == (40.0, 61.0)
    assert bench._median_ci_ranks(3000)[0] > 1  # no float overflow for long runs


def test_fixed_batch_model_runs_only_at_its_batch() -> None:
    result = benchmark([conv_model(4), conv_model(8, shape=(1, 3, 8, 8))], FAST)
    assert [c.batch for c in result.cases] == [1]
    assert any("conv8 has a fixed batch dimension of 1" in w for w in result.cases[0].warnings)


def test_symbolic_dims_need_input_shape() -> None:
    dynamic = (conv_model(4, shape=("N", 3, "H", "W")), conv_model(8, shape=("N", 3, "H", "W")))
    with pytest.raises(ValueError, match="symbolic dimension 2 .*input_shape"):
        benchmark(dynamic, FAST)
    config = BenchConfig(batches=(2,), threads=1, warmup=1, rounds=3, input_shapes={"x": (1, 3, 6, 6)})
    result = benchmark(dynamic, config)
    assert result.cases[0].input_shapes == {"x": [2, 3, 6, 6]}  # batch dim taken from the case


def test_incompatible_inputs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="incompatible shapes"):
        benchmark([conv_model(4), conv_model(4, shape=("N", 3, 6, 6))], FAST)
    renamed = conv_model(4)
    renamed.graph.input[0].name = "image"
    renamed.graph.node[0].input[0] = "image"
    with pytest.raises(ValueError, match="different inputs"):
        benchmark([conv_model(4), renamed], FAST)
    with pytest.raises(ValueError, match="not model inputs"):
        benchmark([conv_model(4)], BenchConfig(threads=1, warmup=1, rounds=1, input_shapes={"y": (1, 3)}))


def test_unreadable_model_is_a_one_line_value_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model\xff" * 10)
    for path in (garbage, tmp_path / "missing.onnx"):
        with pytest.raises(ValueError, match="cannot read ONNX model") as info:
            benchmark([path], FAST)
        assert "\n" not in str(info.value)
    too_new = conv_model(4)
    too_new.ir_version = 99
    with pytest.raises(ValueError, match="onnxruntime cannot load") as info:
        benchmark([too_new], FAST)
    assert "\n" not in str(info.value)


def test_json_round_trip(small_big_result: BenchResult) -> None:
    data = json.loads(json.dumps(small_big_result.to_json()))
    restored = BenchResult.from_json(data)
    assert restored == small_big_result
    assert restored.to_json() == data


def test_format_bench_lists_models(small_big_result: BenchResult) -> None:
    text = format_bench(small_big_result)
    assert "conv4" in text and "conv16" in text
    assert "ratio [95% CI]" in text and "median ms" in text
    assert text.count("\ncpu ") == 4


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_unavailable_provider_is_a_one_line_error(provider: str) -> None:
    if provider in available_providers():
        pytest.skip(f"{provider} works on this machine")
    with pytest.raises(ValueError, match="execution provider is not available: ") as info:
        benchmark([conv_model(4)], BenchConfig(providers=(provider,)))
    assert "\n" not in str(info.value)
    assert str(info.value).startswith({"cuda": "CUDA", "tensorrt": "TensorRT"}[provider])


def test_cpu_fallback_warning_from_placement() -> None:
    def subgraph(ep: str, *ops: str) -> SimpleNamespace:
        nodes = [SimpleNamespace(op_type=op) for op in ops]
        return SimpleNamespace(ep_name=ep, get_nodes=lambda: nodes)

    session = SimpleNamespace(
        get_provider_graph_assignment_info=lambda: [
            subgraph("CUDAExecutionProvider", "Conv", "Relu"),
            subgraph("CPUExecutionProvider", "Shape", "NonZero"),
        ]
    )
    warning = bench._placement_warning("m", session, "cuda")
    assert warning is not None and warning.startswith("m: 2 of 4 nodes are not on CUDAExecutionProvider")
    assert "NonZero x1" in warning and "Shape x1" in warning
    assert bench._placement_warning("m", session, "cpu") is None
    on_gpu = SimpleNamespace(get_provider_graph_assignment_info=lambda: [subgraph("CUDAExecutionProvider", "Conv")])
    assert bench._placement_warning("m", on_gpu, "cuda") is None


def test_placement_is_read_from_a_real_session() -> None:
    session = new_session(conv_model(4), "cpu", threads=1, timed=True)
    placed = bench._placement(session)
    assert set(placed) == {"CPUExecutionProvider"}
    assert sum(placed["CPUExecutionProvider"].values()) >= 1


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    onnx.save(conv_model(4, shape=("N", 3, "H", "W")), small)
    onnx.save(conv_model(16, shape=("N", 3, "H", "W")), big)
    out = tmp_path / "out" / "bench.json"
    argv = ["bench", str(small), str(big), "--providers", "cpu", "--batch", "1,2", "--threads", "1", "--warmup", "1",
            "--rounds", "6", "--min-time", "0", "--cudnn-algo-search", "HEURISTIC", "--input-shape", "x=1x3x8x8",
            "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "small" in printed and "big" in printed
    data = json.loads(out.read_text())
    assert data["config"]["input_shapes"] == {"x": [1, 3, 8, 8]}
    assert data["config"]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert [c["batch"] for c in data["cases"]] == [1, 2]
    assert not any("coverage" in w for c in data["cases"] for w in c["warnings"])  # 6 rounds suffice


def test_command_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = bench_parser()
    for bad in (["m.onnx", "--batch", "0"], ["m.onnx", "--providers", "gpu"], ["m.onnx", "--input-shape", "x=3y"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    capsys.readouterr()
    assert main(["bench", str(tmp_path / "missing.onnx"), "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot read ONNX model" in err and len(err.strip().splitlines()) == 1


def normalizer_model() -> onnx.ModelProto:
    """Relu, then ai.onnx.ml Normalizer, which has no CUDA kernel."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Normalizer", ["r"], ["y"], domain="ai.onnx.ml", norm="MAX"),
        ],
        "normalizer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.gpu
def test_cuda_io_binding_and_fallback_warning() -> None:
    if "cuda" not in available_providers():
        pytest.skip("onnxruntime's CUDA provider does not work here")
    config = BenchConfig(providers=("cuda",), batches=(1, 2), warmup=2, rounds=6, cudnn_conv_algo_search="HEURISTIC")
    result = benchmark([conv_model(4), conv_model(16)], config)
    assert [(c.provider, c.batch) for c in result.cases] == [("cuda", 1), ("cuda", 2)]
    assert result.environment["cudnn_conv_algo_search"] == "HEURISTIC"
    assert result.environment["gpu"]
    assert all(t.median_ms > 0 for c in result.cases for t in c.timings)

    session = new_session(conv_model(4), "cuda", threads=1, timed=True)
    runner = make_runner(session, {"x": np.ones((2, 3, 8, 8), np.float32)}, "cuda")
    runner()
    (output,) = runner._binding.get_outputs()
    assert output.device_name().lower() == "cuda"

    fallback = benchmark([normalizer_model()], BenchConfig(providers=("cuda",), batches=(1,), warmup=1, rounds=2))
    assert any("Normalizer" in w and "CPUExecutionProvider" in w for w in fallback.cases[0].warnings)
