"""Measured per-layer latency on the target provider, so pruning can follow real time, not MACs.

For every splittable layer of a :class:`~onnx_basisprune.pipeline.prepared.Prepared` model,
:func:`measure_latency_table` builds tiny single-layer ONNX models with random weights of the
layer's shape and dtype, fed with the layer's real input shape at the requested batch:

* the *original* node alone (same op, attributes, weight and bias shape as in the model);
* for each measured rank ``r`` per group, the *pair* that :func:`~onnx_basisprune.basis.rewrite.split_node`
  would produce: a basis node (Conv: the original attributes, weight ``(g*r, C_in/g, *k)``, no
  bias; Gemm: ``transB=1``, weight ``(r, K)``; MatMul: ``(K, r)``) followed by a scaling node
  (Conv: 1x1, ``group=g``, weight ``(C_out, r, 1..)``; Gemm/MatMul: ``(N, r)`` / ``(r, N)``) that
  carries the original bias.

Each is timed with onnxruntime exactly like :mod:`onnx_basisprune.runtime.bench` times models (same
session options: ``ORT_ENABLE_ALL``, sequential, the given intra-op threads, no spinning; same
CUDA I/O binding), and the original and every pair of one layer run ALTERNATELY in each round, so
slow drift of a noisy machine hits them alike. A time is the median over at least ``rounds`` rounds
(more until each model ran ``min_time_s``, at most 10x ``rounds``) after a short warm-up, in ms,
and includes one ``session.run`` call (the same overhead for original and pair).

Which ranks. The measured ranks of a layer are its *aligned* ranks, ``{ranks.align(r) | 1 <= r <=
full_rank}``: the multiples of the block step below the full rank, and the full rank. A layer with
more than ``max_ranks`` (default 16) of them is measured on a coarser grid (every k-th aligned rank,
still aligned, plus the full rank), so wide layers cannot blow up the cost; :meth:`LatencyTable.layer_ms`
then answers with the next measured rank up (a conservative, slightly high estimate). Layers with
identical measurement signatures (op, attributes, weight/bias shape, dtype, input shape, ranks) are
measured once and share the numbers: ResNet-style models repeat the same block many times.

Cache. A table is written as JSON to ``cache_dir`` (default ``$BASISPRUNE_CACHE`` if set, else
``~/.cache/onnx-basisprune/latency``), under a key hashing the sha256 of the normalised model proto,
the input-shape overrides, provider, batch, threads, block, max_ranks, rounds, min_time_s, the
machine (CPU model, or GPU name for CUDA/TensorRT) and the onnxruntime version. The same call again loads it
without running onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from ..basis.layers import Layer
from ..io.shapes import infer_shapes
from ..plan import ranks
from .bench import time_alternating
from .machine import cpu_model, gpu_name, physical_cores
from .session import feed_shapes, fixed_batch, input_specs, make_runner, require_provider, timing_session

if TYPE_CHECKING:
    from ..pipeline.prepared import Prepared

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAX_RANKS = 16
# Sub-0.1 ms layers need more than 30 runs for a stable median on a busy machine: each model is
# run until it accumulated this much time (at most 10x rounds).
DEFAULT_MIN_TIME_S = 0.05
DEFAULT_CACHE_DIR = Path("~/.cache/onnx-basisprune/latency")
CACHE_ENV = "BASISPRUNE_CACHE"
_WARMUP = 5


@dataclass
class LayerLatency:
    """Times (ms) of one layer: its node alone, and the basis+scaling pair per measured rank."""

    original_ms: float
    pair_ms: dict[int, float]  # rank per group -> pair time, ascending ranks


@dataclass
class LatencyTable:
    """Per-layer latencies of one model on one provider, batch and thread count."""

    provider: str
    batch: int
    threads: int
    machine: str
    model_sha256: str
    layers: dict[str, LayerLatency]
    block: int = 0
    max_ranks: int | None = DEFAULT_MAX_RANKS
    rounds: int = 0
    min_time_s: float = 0.0
    onnxruntime: str = ""

    def _layer(self, name: str) -> LayerLatency:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"layer {name!r} has no latency entry (measured: {len(self.layers)} layers)") from None

    def break_even_rank(self, name: str) -> int:
        """Largest measured (aligned) rank whose pair is faster than the original node; 0 if none."""
        entry = self._layer(name)
        faster = [rank for rank, ms in entry.pair_ms.items() if ms < entry.original_ms]
        return max(faster, default=0)

    def layer_ms(self, name: str, rank: int | None) -> float:
        """Pair time at the smallest measured rank >= ``rank``; the original's time for None."""
        entry = self._layer(name)
        if rank is None:
            return entry.original_ms
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        above = [r for r in entry.pair_ms if r >= rank]
        if not above:
            raise ValueError(f"rank {rank} of {name!r} is above its largest measured rank {max(entry.pair_ms)}")
        return entry.pair_ms[min(above)]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "provider": self.provider,
            "batch": self.batch,
            "threads": self.threads,
            "machine": self.machine,
            "model_sha256": self.model_sha256,
            "block": self.block,
            "max_ranks": self.max_ranks,
            "rounds": self.rounds,
            "min_time_s": self.min_time_s,
            "onnxruntime": self.onnxruntime,
            "layers": {
                name: {
                    "original_ms": entry.original_ms,
                    "pair_ms": {str(rank): ms for rank, ms in sorted(entry.pair_ms.items())},
                }
                for name, entry in self.layers.items()
            },
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LatencyTable:
        layers = {
            name: LayerLatency(
                original_ms=float(entry["original_ms"]),
                pair_ms={int(rank): float(ms) for rank, ms in sorted(entry["pair_ms"].items(), key=lambda kv: int(kv[0]))},
            )
            for name, entry in d["layers"].items()
        }
        return cls(
            provider=d["provider"],
            batch=int(d["batch"]),
            threads=int(d["threads"]),
            machine=d["machine"],
            model_sha256=d["model_sha256"],
            layers=layers,
            block=int(d.get("block", 0)),
            max_ranks=d.get("max_ranks", DEFAULT_MAX_RANKS),
            rounds=int(d.get("rounds", 0)),
            min_time_s=float(d.get("min_time_s", 0.0)),
            onnxruntime=d.get("onnxruntime", ""),
        )


# --------------------------------------------------------------------------- ranks


def measured_ranks(layer: Layer, block: int, max_ranks: int | None = DEFAULT_MAX_RANKS) -> list[int]:
    """The ranks per group at which ``layer``'s pair is timed, ascending (full rank included).

    Every aligned rank (:func:`ranks.align` of 1..full_rank); with more than ``max_ranks`` of them,
    every k-th one (k as small as keeps at most ``max_ranks``) plus the full rank.
    """
    full = layer.full_rank
    aligned = sorted({int(ranks.align(r, full, block, layer.groups)) for r in range(1, full + 1)})
    if max_ranks is None or len(aligned) <= max_ranks:
        return aligned
    if max_ranks < 1:
        raise ValueError(f"max_ranks must be >= 1 or None, got {max_ranks}")
    k = math.ceil(len(aligned) / max_ranks)
    below = aligned[:-1]
    return below[k - 1 :: k] + [full]


# --------------------------------------------------------------------------- single-layer models


@dataclass(frozen=True)
class _LayerSpec:
    """Everything a layer's timing depends on; equal specs are measured once."""

    op: str
    attributes: bytes  # serialized AttributeProtos of the original node, sorted by name
    weight_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    dtype: int  # ONNX elem type
    input_shape: tuple[int, ...]
    groups: int
    out_channels: int
    ranks: tuple[int, ...]
    opset: int
    ir_version: int
    node_attributes: tuple[onnx.AttributeProto, ...] = field(compare=False, hash=False, repr=False)


def _bias_shape(node: ir.Node, value_shapes: Callable[[ir.Value], tuple[int, ...] | None]) -> tuple[int, ...] | None:
    if node.op_type == "MatMul" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias = node.inputs[2]
    if bias.const_value is not None:
        return tuple(bias.const_value.shape)
    return value_shapes(bias)


def _layer_spec(
    model: ir.Model,
    node: ir.Node,
    layer: Layer,
    input_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
    rank_list: Sequence[int],
    opset: int,
) -> _LayerSpec:
    attrs = tuple(ir.serde.serialize_attribute(node.attributes[k]) for k in sorted(node.attributes))
    return _LayerSpec(
        op=layer.op,
        attributes=b"".join(a.SerializeToString() for a in attrs),
        weight_shape=tuple(layer.weight_shape),
        bias_shape=bias_shape,
        dtype=int(layer.dtype),
        input_shape=tuple(input_shape),
        groups=layer.groups,
        out_channels=layer.out_channels,
        ranks=tuple(rank_list),
        opset=opset,
        ir_version=model.ir_version or 8,
        node_attributes=attrs,
    )


def _initializer(name: str, shape: Sequence[int], dtype: ir.DataType, rng: np.random.Generator) -> onnx.TensorProto:
    array = (rng.standard_normal(tuple(shape)) / math.sqrt(max(1, int(np.prod(shape[1:]))))).astype(dtype.numpy())
    return ir.serde.serialize_tensor(ir.tensor(array, dtype=dtype, name=name))


def _single_model(spec: _LayerSpec, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", spec.dtype, list(spec.input_shape))],
        [helper.make_tensor_value_info("y", spec.dtype, [None] * len(spec.input_shape))],  # same rank as x
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], producer_name="basisprune-latency")
    model.ir_version = spec.ir_version
    return model


def _original_model(spec: _LayerSpec, rng: np.random.Generator) -> onnx.ModelProto:
    """The layer's node alone, with random weights of its shape and dtype."""
    dtype = ir.DataType(spec.dtype)
    inits = [_initializer("w", spec.weight_shape, dtype, rng)]
    inputs = ["x", "w"]
    if spec.bias_shape is not None:
        inits.append(_initializer("b", spec.bias_shape, dtype, rng))
        inputs.append("b")
    node = helper.make_node(spec.op, inputs, ["y"], name="original")
    node.attribute.extend(spec.node_attributes)
    return _single_model(spec, [node], inits, "original")


def _pair_model(spec: _LayerSpec, rank: int, rng: np.random.Generator) -> onnx.ModelProto:
    """The basis + scaling pair at ``rank`` per group, shaped as rewrite.split_node builds it."""
    dtype = ir.DataType(spec.dtype)
    g, r = spec.groups, rank
    bias_inputs, bias_inits = [], []
    if spec.bias_shape is not None:
        bias_inits = [_initializer("b", spec.bias_shape, dtype, rng)]
        bias_inputs = ["b"]
    if spec.op == "Conv":
        spatial = len(spec.weight_shape) - 2
        basis_w = (g * r, *spec.weight_shape[1:])
        scaling_w = (spec.out_channels, r, *([1] * spatial))
        basis = helper.make_node("Conv", ["x", "wb"], ["h"], name="basis")
        basis.attribute.extend(spec.node_attributes)
        scaling = helper.make_node(
            "Conv", ["h", "ws", *bias_inputs], ["y"], name="scaling", group=g, kernel_shape=[1] * spatial
        )
    elif spec.op == "Gemm":
        fan_in = spec.weight_shape[0] if _attr_int(spec, "transB", 0) == 0 else spec.weight_shape[1]
        basis_w, scaling_w = (r, fan_in), (spec.out_channels, r)
        beta = _attr_float(spec, "beta", 1.0)
        basis = helper.make_node("Gemm", ["x", "wb"], ["h"], name="basis", transB=1)
        scaling = helper.make_node("Gemm", ["h", "ws", *bias_inputs], ["y"], name="scaling", transB=1, beta=beta)
    else:  # MatMul
        basis_w, scaling_w = (spec.weight_shape[0], r), (r, spec.weight_shape[1])
        basis = helper.make_node("MatMul", ["x", "wb"], ["h"], name="basis")
        scaling = helper.make_node("MatMul", ["h", "ws"], ["y"], name="scaling")
    inits = [_initializer("wb", basis_w, dtype, rng), _initializer("ws", scaling_w, dtype, rng), *bias_inits]
    return _single_model(spec, [basis, scaling], inits, f"pair_r{rank}")


def _attr(spec: _LayerSpec, name: str) -> onnx.AttributeProto | None:
    return next((a for a in spec.node_attributes if a.name == name), None)


def _attr_int(spec: _LayerSpec, name: str, default: int) -> int:
    a = _attr(spec, name)
    return default if a is None else int(a.i)


def _attr_float(spec: _LayerSpec, name: str, default: float) -> float:
    a = _attr(spec, name)
    return default if a is None else float(a.f)


# --------------------------------------------------------------------------- timing


def _time_runners(runners: Sequence[Callable[[], Any]], warmup: int, rounds: int, min_time_s: float) -> list[float]:
    """Median latency (ms) of each runner, timed alternately (one run of each per round); rounds
    are added until every runner ran ``min_time_s`` (at most 10x ``rounds``, as in bench)."""
    times = time_alternating(runners, warmup, rounds, min_time_s)
    return [float(np.median(t)) for t in times]


def _feeds(spec: _LayerSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal(spec.input_shape).astype(ir.DataType(spec.dtype).numpy())}


def _measure_spec(spec: _LayerSpec, label: str, provider: str, threads: int, rounds: int, min_time_s: float) -> LayerLatency:
    rng = np.random.default_rng(0)
    models = [_original_model(spec, rng)] + [_pair_model(spec, r, rng) for r in spec.ranks]
    feeds = _feeds(spec, rng)
    runners = []
    for model in models:
        session = timing_session(model, provider, threads, f"{label} ({model.graph.name})")
        runners.append(make_runner(session, feeds, provider))
    medians = _time_runners(runners, _WARMUP, rounds, min_time_s)
    return LayerLatency(original_ms=medians[0], pair_ms=dict(zip(spec.ranks, medians[1:])))


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$BASISPRUNE_CACHE`` when set, else ``~/.cache/onnx-basisprune/latency``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _machine(provider: str) -> str:
    return gpu_name() if provider in ("cuda", "tensorrt") else cpu_model()


def _cache_key(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _load_cached(path: Path, key_fields: Mapping[str, Any]) -> LatencyTable | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != json.loads(json.dumps(key_fields)):
            return None
        return LatencyTable.from_json(data["table"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(path: Path, key_fields: Mapping[str, Any], table: LatencyTable) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"key": key_fields, "table": table.to_json()}, f, indent=1)
        os.replace(f.name, path)
    except OSError as exc:
        logger.warning("could not write the latency cache %s: %s", path, exc)


# --------------------------------------------------------------------------- measurement


def _batch_inputs(prepared: Prepared, proto: onnx.ModelProto, batch: int) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the model inputs at ``batch`` (bench's rules); error on a fixed other batch."""
    inputs = input_specs(proto, "model")
    fixed = fixed_batch(inputs)
    if fixed is not None and fixed != batch:
        raise ValueError(f"the model has a fixed batch dimension of {fixed}; cannot measure at batch {batch}")
    return feed_shapes(inputs, prepared.input_shapes, batch)


def measure_latency_table(
    prepared: Prepared,
    provider: str = "cpu",
    batch: int = 1,
    threads: int | None = None,
    block: int | None = None,
    cache_dir: Path | None = None,
    rounds: int = 30,
    max_ranks: int | None = DEFAULT_MAX_RANKS,
    min_time_s: float = DEFAULT_MIN_TIME_S,
) -> LatencyTable:
    """Time every splittable layer of ``prepared`` (original node and pair per measured rank) on
    ``provider``; cached on disk (see the module docstring).

    ``threads`` defaults to the physical cores (as in bench), ``block`` to ``ranks.block_size``,
    ``max_ranks`` caps the ranks timed per layer (None: every aligned rank); ``min_time_s`` adds
    rounds (up to 10x ``rounds``) until each single-layer model ran that long. Raises ValueError for
    an unavailable provider, bad arguments, or a model onnxruntime cannot run at ``batch``.
    """
    require_provider(provider)
    if batch < 1 or rounds < 1 or (threads is not None and threads < 1) or min_time_s < 0:
        raise ValueError(
            f"batch, rounds and threads must be >= 1 and min_time_s >= 0, got {batch}, {rounds}, {threads}, {min_time_s}"
        )
    threads = threads or physical_cores()
    block = block or ranks.block_size("cuda" if provider in ("cuda", "tensorrt") else provider)
    proto = ir.to_proto(prepared.model)
    sha = hashlib.sha256(proto.SerializeToString()).hexdigest()
    machine = _machine(provider)
    overrides = {k: [int(d) for d in v] for k, v in (prepared.input_shapes or {}).items()}
    key_fields = {
        "format": FORMAT_VERSION, "model_sha256": sha, "input_shapes": overrides, "provider": provider,
        "batch": batch, "threads": threads, "block": block, "max_ranks": max_ranks, "rounds": rounds,
        "min_time_s": min_time_s, "machine": machine, "onnxruntime": ort.__version__,
    }
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"{sha[:16]}-{provider}-b{batch}-t{threads}-{_cache_key(key_fields)[:16]}.json"
    cached = _load_cached(path, key_fields)
    if cached is not None:
        logger.info("latency table loaded from %s", path)
        return cached

    model_inputs = _batch_inputs(prepared, proto, batch)
    shapes = prepared.shapes if batch == 1 else infer_shapes(prepared.model, model_inputs)
    opset = prepared.model.opset_imports.get("", prepared.model.opset_imports.get("ai.onnx", 17))
    measured: dict[_LayerSpec, LayerLatency] = {}
    layers: dict[str, LayerLatency] = {}
    nodes = {node.name: node for node in prepared.model.graph}
    for name, layer in prepared.layers.items():
        if layer.skip_reason is not None:
            continue
        node = nodes[name]
        input_shape = shapes.get(node.inputs[0])
        if input_shape is None:
            logger.warning("latency: input shape of %s unknown at batch %d; layer not measured", name, batch)
            continue
        rank_list = measured_ranks(layer, block, max_ranks)
        spec = _layer_spec(prepared.model, node, layer, input_shape, _bias_shape(node, shapes.get), rank_list, opset)
        if spec not in measured:
            measured[spec] = _measure_spec(spec, name, provider, threads, rounds, min_time_s)
        layers[name] = LayerLatency(measured[spec].original_ms, dict(measured[spec].pair_ms))
    logger.info("latency: %d layers measured as %d distinct single-layer setups", len(layers), len(measured))
    table = LatencyTable(
        provider=provider, batch=batch, threads=threads, machine=machine, model_sha256=sha, layers=layers,
        block=block, max_ranks=max_ranks, rounds=rounds,
        min_time_s=min_time_s, onnxruntime=ort.__version__,
    )
    _store(path, key_fields, table)
    return table
