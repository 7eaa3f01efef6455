"""Shared test helpers: the ../shared assets, small ONNX models built with onnx.helper, and
running a model on onnxruntime CPU to compare outputs by max relative error."""

from __future__ import annotations

import os

# One BLAS thread: the SVDs here are of small matrices, and OpenBLAS worker threads that spin
# on busy shared cores make each one up to 100x slower (0.5 s instead of 5 ms for 64x576).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
EXAMPLE_MODEL = ROOT / "examples" / "digits" / "model.onnx"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the checkout (real models and data); skip when absent."""
    if not (SHARED / "models").is_dir():
        pytest.skip(f"../shared not present ({SHARED}); real-model tests need it")
    return SHARED


def shared_model(shared_dir: Path, name: str) -> Path:
    path = shared_dir / "models" / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


# ---------------------------------------------------------------------------------------------
# Building small models


def tensor(name: str, array: np.ndarray) -> TensorProto:
    """An initializer from a numpy array (bfloat16 given as float32 values, see ``bf16_tensor``)."""
    return numpy_helper.from_array(np.array(array, order="C"), name=name)


def bf16_tensor(name: str, array: np.ndarray) -> TensorProto:
    """A BFLOAT16 initializer holding ``array`` rounded to bfloat16 (round to nearest even)."""
    bits = np.asarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    t = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(array.shape))
    t.raw_data = rounded.tobytes()
    return t


def bf16_to_float32(t: TensorProto) -> np.ndarray:
    """Values of a BFLOAT16 TensorProto as float32."""
    raw = np.frombuffer(t.raw_data, dtype=np.uint16) if t.raw_data else np.asarray(t.int32_data, dtype=np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, Sequence[int | str | None]]],
    outputs: Sequence[tuple[str, int, Sequence[int | str | None] | None]],
    initializers: Sequence[TensorProto] = (),
    *,
    opset: int = 17,
    ir_version: int | None = None,
    name: str = "test",
    initializers_as_inputs: bool = False,
    check: bool = True,
) -> onnx.ModelProto:
    """A model from nodes, (name, elem_type, dims) inputs/outputs and initializers."""
    graph_inputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    if initializers_as_inputs:
        graph_inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in initializers]
    graph = helper.make_graph(
        list(nodes),
        name,
        graph_inputs,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="basisprune-tests")
    model.ir_version = ir_version if ir_version is not None else min(model.ir_version, 8)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(
    in_ch: int = 8,
    out_ch: int = 12,
    kernel: Sequence[int] = (3, 3),
    spatial: Sequence[int] = (9, 10),
    *,
    groups: int = 1,
    bias: bool = True,
    dtype: int = TensorProto.FLOAT,
    seed: int = 0,
    opset: int = 17,
    **attrs,
) -> onnx.ModelProto:
    """``x [N, in_ch, *spatial] -> Conv -> y`` with random weights; ``attrs`` go to the Conv."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_ch, in_ch // groups, *kernel)).astype(np.float32)
    w /= np.sqrt(w[0].size)
    b = rng.standard_normal(out_ch).astype(np.float32)
    make = bf16_tensor if dtype == TensorProto.BFLOAT16 else lambda n, a: tensor(n, a.astype(helper.tensor_dtype_to_np_dtype(dtype)))
    inits = [make("W", w)] + ([make("B", b)] if bias else [])
    node = helper.make_node(
        "Conv", ["x", "W", "B"] if bias else ["x", "W"], ["y"], name="conv", group=groups, kernel_shape=list(kernel), **attrs
    )
    nd = len(kernel)
    return make_model(
        [node],
        [("x", dtype, ["N", in_ch, *spatial])],
        [("y", dtype, ["N", out_ch] + [None] * nd)],
        inits,
        opset=opset,
    )


# ---------------------------------------------------------------------------------------------
# Running models


def session(model: onnx.ModelProto | str | os.PathLike) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    # Compare the graph as written: no fusions that could hide (or add) numerical differences.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto | str | os.PathLike, batch: int = 2, seed: int = 0,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Random normal inputs for every real input of ``model`` (symbolic dims: batch first, else ``shapes``)."""
    sess = session(model)
    rng = np.random.default_rng(seed)
    feeds = {}
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
    for inp in sess.get_inputs():
        if shapes and inp.name in shapes:
            dims = list(shapes[inp.name])
        else:
            dims = [d if isinstance(d, int) else (batch if i == 0 else None) for i, d in enumerate(inp.shape)]
            assert None not in dims, f"give a shape for input {inp.name} {inp.shape}"
        feeds[inp.name] = rng.standard_normal(dims).astype(types[inp.type])
    return feeds


def run(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, dict(feeds))


def max_rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|a| in float64 (a is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.abs(a).max()
    return float(np.abs(a - b).max() / (scale if scale > 0 else 1.0))


def assert_same_outputs(
    reference: onnx.ModelProto | str | os.PathLike,
    candidate: onnx.ModelProto | str | os.PathLike,
    feeds: Mapping[str, np.ndarray] | None = None,
    tol: float = 1e-4,
    batch: int = 2,
) -> float:
    """Run both models on the same (random) inputs; every output within ``tol`` max relative error.

    Returns the largest error seen."""
    feeds = feeds if feeds is not None else random_feeds(reference, batch=batch)
    ref = run(reference, feeds)
    got = run(candidate, feeds)
    assert len(ref) == len(got)
    worst = 0.0
    for r, g in zip(ref, got):
        err = max_rel_error(r, g)
        assert err <= tol, f"max relative error {err:.3g} > {tol:g}"
        worst = max(worst, err)
    return worst


def low_rank_weight(rng: np.random.Generator, out_ch: int, fan_in: int, decay: float = 6.0) -> np.ndarray:
    """A random ``(out_ch, fan_in)`` matrix whose singular values decay like exp(-i/decay)."""
    r = min(out_ch, fan_in)
    u, _ = np.linalg.qr(rng.standard_normal((out_ch, r)))
    v, _ = np.linalg.qr(rng.standard_normal((fan_in, r)))
    s = np.exp(-np.arange(r) / decay)
    return ((u * s) @ v.T / np.sqrt(fan_in / 8)).astype(np.float32)


def cnn_model(seed: int = 0, opset: int = 17, decay: float = 6.0) -> onnx.ModelProto:
    """A small CNN (4 Conv + Relu, GlobalAveragePool, Gemm) on [N, 3, 32, 32] whose weights have
    decaying spectra, so that energy-based pruning has something to choose."""
    rng = np.random.default_rng(seed)
    convs = [("conv1", 3, 32, 3, 1), ("conv2", 32, 64, 3, 2), ("conv3", 64, 64, 3, 1), ("conv4", 64, 128, 1, 1)]
    nodes, inits, x = [], [], "input"
    for name, cin, cout, k, stride in convs:
        w = low_rank_weight(rng, cout, cin * k * k, decay).reshape(cout, cin, k, k)
        inits += [tensor(f"{name}.weight", w), tensor(f"{name}.bias", 0.1 * rng.standard_normal(cout).astype(np.float32))]
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name,
                                      kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride]))
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}.relu"))
        x = f"{name}.relu"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    inits += [tensor("fc.weight", low_rank_weight(rng, 100, 128, decay)), tensor("fc.bias", rng.standard_normal(100).astype(np.float32))]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    return make_model(nodes, [("input", TensorProto.FLOAT, ["N", 3, 32, 32])], [("logits", TensorProto.FLOAT, ["N", 100])],
                      inits, opset=opset)


def initializer_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)
