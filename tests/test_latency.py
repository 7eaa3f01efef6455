"""Tests of onnx_basisprune.runtime.latency: per-layer latency tables on the CPU provider (few rounds, no
assertions on timings themselves), rank grids, lookup semantics, cache and JSON round-trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_basisprune.runtime import latency
from onnx_basisprune.api import prepare
from onnx_basisprune.runtime.latency import LatencyTable, LayerLatency, measure_latency_table, measured_ranks
from onnx_basisprune.plan.ranks import align, block_size

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits" / "model.onnx"
FAST = {"threads": 1, "rounds": 3, "min_time_s": 0.0}


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    """A float model; outputs are (name, rank) with unknown dims."""
    graph = helper.make_graph(
        nodes,
        "latency_test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * rank) for n, rank in outputs],
        [numpy_helper.from_array(a, name) for name, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(batch_dim: int | str = "N") -> onnx.ModelProto:
    """x[N,16,16,16] -> Conv 16->32 (bias) -> Relu -> Conv 32->64 stride 2 -> Relu -> Conv 64->64 group 2 (bias) -> Relu."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) / math.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wb"], ["b"], name="conv_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("Conv", ["br", "wc", "bc"], ["c"], name="conv_c", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inits = {"wa": w(32, 16, 3, 3), "ba": w(32), "wb": w(64, 32, 3, 3), "wc": w(64, 32, 3, 3), "bc": w(64)}
    return _model(nodes, [("x", [batch_dim, 16, 16, 16])], [("y", 4)], inits)


def fc_model() -> onnx.ModelProto:
    """x1[N,512] -> Gemm (transB=0, bias) -> y1;  x2[N,16,128] -> MatMul -> y2."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["x1", "wg", "bg"], ["y1"], name="gemm"),
        helper.make_node("MatMul", ["x2", "wm"], ["y2"], name="matmul"),
    ]
    inits = {
        "wg": rng.standard_normal((512, 256)).astype(np.float32),
        "bg": rng.standard_normal(256).astype(np.float32),
        "wm": rng.standard_normal((128, 128)).astype(np.float32),
    }
    return _model(nodes, [("x1", ["N", 512]), ("x2", ["N", 16, 128])], [("y1", 2), ("y2", 3)], inits)


def all_aligned(layer, block: int) -> list[int]:
    return sorted({int(align(r, layer.full_rank, block, layer.groups)) for r in range(1, layer.full_rank + 1)})


@pytest.fixture(scope="module")
def small():
    return prepare(conv_model())


@pytest.fixture(scope="module")
def small_table(small, tmp_path_factory) -> LatencyTable:
    return measure_latency_table(small, block=8, cache_dir=tmp_path_factory.mktemp("lat"), **FAST)


def check_table(table: LatencyTable, prepared, all_ranks: bool = True) -> None:
    assert set(table.layers) == set(prepared.splittable())
    assert table.provider == "cpu" and table.batch >= 1 and table.threads >= 1 and table.machine
    assert len(table.model_sha256) == 64
    for name, entry in table.layers.items():
        layer = prepared.layers[name]
        expected = all_aligned(layer, table.block)
        if all_ranks:
            assert list(entry.pair_ms) == expected
        else:
            assert set(entry.pair_ms) <= set(expected) and max(entry.pair_ms) == layer.full_rank
        assert entry.original_ms > 0 and all(ms > 0 for ms in entry.pair_ms.values())
        be = table.break_even_rank(name)
        assert 0 <= be <= layer.full_rank
        if be:
            assert entry.pair_ms[be] < entry.original_ms
        assert all(entry.pair_ms[r] >= entry.original_ms for r in entry.pair_ms if r > be)


def test_small_model_table(small, small_table: LatencyTable) -> None:
    table = small_table
    assert set(table.layers) == {"conv_a", "conv_b", "conv_c"}
    assert (table.batch, table.threads, table.block, table.rounds) == (1, 1, 8, 3)
    check_table(table, small)
    assert list(table.layers["conv_a"].pair_ms) == [8, 16, 24, 32]
    assert list(table.layers["conv_b"].pair_ms) == list(range(8, 65, 8))
    assert list(table.layers["conv_c"].pair_ms) == list(range(4, 33, 4))  # group 2: 8 channels = 4 per group


def test_layer_ms_lookup(small, small_table: LatencyTable) -> None:
    table = small_table
    for name, entry in table.layers.items():
        full = small.layers[name].full_rank
        assert table.layer_ms(name, None) == entry.original_ms
        previous = 0
        for rank in range(1, full + 1):
            chosen = min(r for r in entry.pair_ms if r >= rank)
            assert chosen >= previous
            previous = chosen
            assert table.layer_ms(name, rank) == entry.pair_ms[chosen]
        for rank in entry.pair_ms:
            assert table.layer_ms(name, rank) == entry.pair_ms[rank]
        with pytest.raises(ValueError):
            table.layer_ms(name, full + 1)
        with pytest.raises(ValueError):
            table.layer_ms(name, 0)
    with pytest.raises(KeyError):
        table.layer_ms("no such layer", 1)


def test_break_even_semantics_on_fixed_numbers() -> None:
    table = LatencyTable(
        provider="cpu", batch=1, threads=1, machine="m", model_sha256="0" * 64,
        layers={
            "monotone": LayerLatency(3.0, {8: 1.0, 16: 2.0, 24: 3.5, 32: 5.0}),
            "bumpy": LayerLatency(3.0, {8: 1.0, 16: 4.0, 24: 2.5, 32: 5.0}),
            "never": LayerLatency(1.0, {8: 1.5, 16: 2.0}),
            "tie": LayerLatency(2.0, {8: 2.0, 16: 3.0}),
        },
    )
    assert table.break_even_rank("monotone") == 16
    assert table.break_even_rank("bumpy") == 24  # largest rank whose pair is faster
    assert table.break_even_rank("never") == 0
    assert table.break_even_rank("tie") == 0  # strictly faster
    assert [table.layer_ms("monotone", r) for r in (1, 8, 9, 16, 17, 32)] == [1.0, 1.0, 2.0, 2.0, 3.5, 5.0]


def test_json_round_trip(small_table: LatencyTable) -> None:
    data = json.loads(json.dumps(small_table.to_json()))
    back = LatencyTable.from_json(data)
    assert back == small_table
    assert all(isinstance(r, int) for entry in back.layers.values() for r in entry.pair_ms)


def test_cache_hit_skips_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = latency._time_runners

    def counting(runners, warmup, rounds, min_time_s):
        calls.append(len(runners))
        return real(runners, warmup, rounds, min_time_s)

    monkeypatch.setattr(latency, "_time_runners", counting)
    args = {"block": 8, "cache_dir": tmp_path, "threads": 1, "rounds": 2, "min_time_s": 0.0}
    first = measure_latency_table(prepare(conv_model()), **args)
    assert len(calls) == 3  # three layers (original + pairs alternately)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def no_session(*a, **k):
        raise AssertionError("onnxruntime used on a cache hit")

    monkeypatch.setattr(latency, "timing_session", no_session)
    again = measure_latency_table(prepare(conv_model()), **args)  # a fresh prepare: same normalised bytes
    assert len(calls) == 3 and again == first

    monkeypatch.undo()
    monkeypatch.setattr(latency, "_time_runners", counting)
    other = measure_latency_table(prepare(conv_model()), **{**args, "block": 16})  # another key
    assert len(calls) == 6 and list(other.layers["conv_b"].pair_ms) == [16, 32, 48, 64]
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_cache_dir_from_environment(small, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "env-cache"))
    assert latency.default_cache_dir() == tmp_path / "env-cache"
    measure_latency_table(small, block=16, **FAST)
    assert len(list((tmp_path / "env-cache").glob("*.json"))) == 1


def test_single_layer_models_at_batch(small, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At batch 2 the single-layer models take the layer's real input shape, the pair is shaped as
    split_node builds it (basis: original attributes; scaling: 1x1 with the groups), and the pair's
    output has the original's shape."""
    built: list[onnx.ModelProto] = []
    real = latency.timing_session

    def recording(model, *args):
        built.append(model)
        return real(model, *args)

    monkeypatch.setattr(latency, "timing_session", recording)
    table = measure_latency_table(small, batch=2, block=8, cache_dir=tmp_path, threads=1, rounds=1, min_time_s=0.0)
    assert table.batch == 2
    check_table(table, small)
    inputs = {"conv_a": [2, 16, 16, 16], "conv_b": [2, 32, 16, 16], "conv_c": [2, 64, 8, 8]}
    models = iter(built)
    for name in ("conv_a", "conv_b", "conv_c"):
        layer = small.layers[name]
        original = next(models)
        pairs = [next(models) for _ in table.layers[name].pair_ms]
        feeds = {"x": np.ones(inputs[name], np.float32)}
        for m in [original, *pairs]:
            onnx.checker.check_model(m, full_check=True)
            assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == inputs[name]
        expect = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0].shape
        assert expect[:2] == (2, layer.out_channels)
        for rank, pair in zip(table.layers[name].pair_ms, pairs):
            weights = {t.name: tuple(t.dims) for t in pair.graph.initializer}
            g = layer.groups
            assert weights["wb"] == (g * rank, *layer.weight_shape[1:])
            assert weights["ws"] == (layer.out_channels, rank, 1, 1)
            basis, scaling = pair.graph.node
            orig_attrs = {a.name: helper.get_attribute_value(a) for a in original.graph.node[0].attribute}
            assert {a.name: helper.get_attribute_value(a) for a in basis.attribute} == orig_attrs
            assert {a.name: helper.get_attribute_value(a) for a in scaling.attribute} == {"group": g, "kernel_shape": [1, 1]}
            assert len(scaling.input) == len(original.graph.node[0].input)  # the bias moves to the scaling node
            got = ort.InferenceSession(pair.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0].shape
            assert got == expect
    assert next(models, None) is None  # nothing else is timed


def test_fixed_batch_model_rejects_other_batch(tmp_path: Path) -> None:
    prepared = prepare(conv_model(batch_dim=1))
    with pytest.raises(ValueError, match="fixed batch dimension of 1"):
        measure_latency_table(prepared, batch=2, cache_dir=tmp_path, threads=1, rounds=1)


def test_gemm_matmul_and_rank_cap(tmp_path: Path) -> None:
    prepared = prepare(fc_model())
    gemm, matmul = prepared.layers["gemm"], prepared.layers["matmul"]
    assert (gemm.full_rank, matmul.full_rank) == (256, 128)
    assert measured_ranks(gemm, 8, None) == list(range(8, 257, 8))
    assert measured_ranks(gemm, 8, 16) == list(range(16, 257, 16))  # every second aligned rank
    capped = measured_ranks(gemm, 8, 5)
    assert len(capped) <= 5 and capped[-1] == 256 and set(capped) <= set(range(8, 257, 8))
    table = measure_latency_table(prepared, block=8, cache_dir=tmp_path, threads=1, rounds=2, min_time_s=0.0)
    check_table(table, prepared, all_ranks=False)
    assert list(table.layers["gemm"].pair_ms) == list(range(16, 257, 16))
    assert list(table.layers["matmul"].pair_ms) == list(range(8, 129, 8))
    assert table.layer_ms("gemm", 9) == table.layers["gemm"].pair_ms[16]  # next measured rank up


def test_digits_example(tmp_path: Path) -> None:
    prepared = prepare(DIGITS)
    table = measure_latency_table(prepared, cache_dir=tmp_path, max_ranks=None, **FAST)
    assert table.block == block_size("cpu")
    assert len(table.layers) == len(prepared.splittable()) == 5
    check_table(table, prepared)
    assert measure_latency_table(prepared, cache_dir=tmp_path, max_ranks=None, **FAST) == table  # cached
