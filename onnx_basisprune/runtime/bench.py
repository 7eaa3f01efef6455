"""Trustworthy onnxruntime latency comparison of ONNX models.

``benchmark`` times several models (typically an original and its pruned
version) on the same random inputs, for each requested execution provider and
batch size, and reports per-model median / p90 / min latency plus, for every
model after the first, its latency ratio to the first with a 95% confidence
interval.

How the numbers are made trustworthy:

* All sessions (:func:`.session.timing_session`) use ``ORT_ENABLE_ALL`` graph optimisation, sequential
  execution, ``intra_op_num_threads`` = the requested thread count (default:
  physical cores usable by this process) and one inter-op thread.  Intra-op
  thread spinning is switched off: the models are timed alternately, and
  spinning workers of the session that just finished would otherwise steal
  cores from the next one.
* After ``warmup`` runs per model, the models run ALTERNATELY: each round
  runs every model once, in the same order (A, B, A, B, ...), so slow drift of
  a noisy machine (frequency scaling, other jobs) hits all models alike.
  ``min_time_s`` adds rounds until every model has accumulated that much timed
  run time (at most ten times ``rounds``).  The garbage collector is paused
  while timing.
* The ratio of model B to model A is the median of the per-round ratios
  B_i / A_i.  Its 95% confidence interval is the distribution-free
  order-statistics interval for a median: with n rounds, the sorted ratios
  r_(k) and r_(n-k+1), where k is the largest rank such that
  P(Binomial(n, 1/2) <= k - 1) <= 2.5%.  It needs no assumption about the
  latency distribution and no random resampling.  Below 6 rounds no such k
  exists; the interval is then [min, max] and the case carries a warning with
  its real coverage (1 - 2^(1-n)).
* CUDA and TensorRT: inputs are copied to the GPU once and inputs and outputs
  are bound there with I/O binding, so host-device copies are not timed.
  ``cudnn_conv_algo_search`` is set explicitly (EXHAUSTIVE by default) and
  recorded; TensorRT engines are cached in a temporary directory for the
  duration of the call.  Node placement is read from onnxruntime's EP graph
  assignment record (session config ``session.record_ep_graph_assignment_info``
  plus ``InferenceSession.get_provider_graph_assignment_info()``); nodes not
  placed on the requested provider (e.g. fallen back to the CPU) produce a
  warning in the case (also logged).
* The result records what the numbers depend on: onnxruntime version,
  providers, CPU model, GPU name, threads, batch, input shapes and date.

Random inputs use the models' input dtypes and shapes; the first (batch)
dimension, when symbolic, is replaced by the batch size.  Other symbolic
dimensions need ``input_shapes`` (the override's first dimension is replaced by
the batch size when the model's batch dimension is symbolic).  Models whose
batch dimension is a fixed number run only at that batch, with a warning.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from .machine import cpu_model, gpu_name, physical_cores
from .session import (
    ALGO_SEARCH_CHOICES,
    DEFAULT_ALGO_SEARCH,
    DEVICE_ID,
    EP_NAMES,
    InputSpec,
    feed_shapes,
    fixed_batch,
    input_specs,
    make_runner,
    one_line,
    random_feeds,
    require_provider,
    timing_session,
)

logger = logging.getLogger(__name__)

_CI_TAIL = Fraction(1, 40)  # 2.5% on each side of the 95% interval
_MIN_TIME_ROUND_FACTOR = 10  # min_time_s may add rounds up to this multiple of `rounds`


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; see the module docstring for how."""

    providers: tuple[str, ...] = ("cpu",)  # "cpu" | "cuda" | "tensorrt"
    batches: tuple[int, ...] = (1, 8)
    threads: int | None = None  # None -> physical cores
    warmup: int = 10
    rounds: int = 50  # timed runs per model
    min_time_s: float = 0.0  # keep adding rounds until each model ran this long (cap: 10x rounds)
    cudnn_conv_algo_search: str = DEFAULT_ALGO_SEARCH
    input_shapes: Mapping[str, Sequence[int]] | None = None


@dataclass
class Timing:
    """Latency statistics of one model in one case (milliseconds)."""

    model: str
    median_ms: float
    p90_ms: float
    min_ms: float
    ratio: float | None  # median of per-round ratios to the first model; None for the first
    ratio_ci: tuple[float, float] | None  # 95% order-statistics interval of that median


@dataclass
class BenchCase:
    """All models timed on one provider at one batch size."""

    provider: str
    batch: int
    threads: int
    timings: list[Timing]
    warnings: list[str]
    input_shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class BenchResult:
    """Everything measured, plus what the numbers depend on."""

    environment: dict[str, str]
    config: BenchConfig
    cases: list[BenchCase]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (dicts, lists, str, numbers, None); ``from_json`` reads it back."""
        config = {f.name: getattr(self.config, f.name) for f in fields(self.config)}
        if self.config.input_shapes is not None:
            config["input_shapes"] = {k: [int(d) for d in v] for k, v in self.config.input_shapes.items()}
        return _plain_json({
            "environment": self.environment,
            "config": config,
            "cases": [asdict(case) for case in self.cases],
        })

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchResult:
        """Inverse of ``to_json`` (after a trip through ``json.dumps`` / ``json.loads``)."""
        config = dict(data["config"])
        for key in ("providers", "batches"):
            config[key] = tuple(config[key])
        if config.get("input_shapes") is not None:
            config["input_shapes"] = {k: tuple(v) for k, v in config["input_shapes"].items()}
        cases = [
            BenchCase(
                provider=case["provider"],
                batch=case["batch"],
                threads=case["threads"],
                timings=[_timing_from_json(t) for t in case["timings"]],
                warnings=list(case["warnings"]),
                input_shapes={k: list(v) for k, v in case.get("input_shapes", {}).items()},
            )
            for case in data["cases"]
        ]
        return cls(environment=dict(data["environment"]), config=BenchConfig(**config), cases=cases)


def _plain_json(value: Any) -> Any:
    """Tuples and other sequences as lists, mappings as dicts, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    return value


def _timing_from_json(data: Mapping[str, Any]) -> Timing:
    ci = data["ratio_ci"]
    return Timing(
        model=data["model"],
        median_ms=data["median_ms"],
        p90_ms=data["p90_ms"],
        min_ms=data["min_ms"],
        ratio=data["ratio"],
        ratio_ci=None if ci is None else (ci[0], ci[1]),
    )


# --------------------------------------------------------------------------- placement


def _placement(session: ort.InferenceSession) -> dict[str, Counter[str]]:
    """Op-type counts per execution provider, from onnxruntime's EP assignment record."""
    placed: dict[str, Counter[str]] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        ops = placed.setdefault(subgraph.ep_name, Counter())
        ops.update(node.op_type for node in subgraph.get_nodes())
    return placed


def _placement_warning(model: str, session: ort.InferenceSession, provider: str) -> str | None:
    """A warning if some nodes of ``model`` do not run on ``provider`` (e.g. CPU fallback)."""
    if provider == "cpu":
        return None
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return f"{model}: cannot check node placement, onnxruntime {ort.__version__} lacks EP assignment info"
    placed = _placement(session)
    wanted = EP_NAMES[provider]
    total = sum(sum(ops.values()) for ops in placed.values())
    elsewhere = {ep: ops for ep, ops in placed.items() if ep != wanted and ops}
    if not elsewhere:
        return None
    moved = sum(sum(ops.values()) for ops in elsewhere.values())
    detail = "; ".join(
        f"{ep}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())) for ep, ops in sorted(elsewhere.items())
    )
    note = ""
    if EP_NAMES["cpu"] in elsewhere:
        note = " (onnxruntime keeps small shape ops on the CPU on purpose; other ops there cost host-device copies)"
    return f"{model}: {moved} of {total} nodes are not on {wanted}: {detail}{note}"


# --------------------------------------------------------------------------- models and inputs


@dataclass(frozen=True)
class _Model:
    name: str
    source: str | bytes  # what InferenceSession loads (path keeps external data working)
    inputs: dict[str, InputSpec]


def _load_model(model: str | Path | onnx.ModelProto, default_name: str) -> _Model:
    if isinstance(model, onnx.ModelProto):
        return _Model(model.graph.name or default_name, model.SerializeToString(), input_specs(model, default_name))
    path = Path(model)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises many kinds of errors for bad files
        raise ValueError(f"cannot read ONNX model {path}: {one_line(exc)}") from None
    return _Model(path.stem, str(path), input_specs(proto, str(path)))


def _unique_names(names: Sequence[str]) -> list[str]:
    counts = Counter(names)
    return [f"{name}[{i}]" if counts[name] > 1 else name for i, name in enumerate(names)]


def _merge_inputs(models: Sequence[_Model]) -> dict[str, InputSpec]:
    """One input signature valid for all models: same names and dtypes, compatible shapes."""
    first = models[0]
    merged = dict(first.inputs)
    for model in models[1:]:
        if set(model.inputs) != set(merged):
            raise ValueError(
                f"models {first.name} and {model.name} have different inputs: "
                f"{sorted(first.inputs)} vs {sorted(model.inputs)}"
            )
        for name, spec in model.inputs.items():
            merged[name] = _merge_spec(name, merged[name], spec, (first.name, model.name))
    return merged


def _merge_spec(name: str, a: InputSpec, b: InputSpec, models: tuple[str, str]) -> InputSpec:
    where = f"input {name!r} of {models[0]} and {models[1]}"
    if a.dtype != b.dtype:
        raise ValueError(f"{where} differ in dtype: {a.dtype} vs {b.dtype}")
    if a.dims is None or b.dims is None:
        return InputSpec(a.dtype, a.dims if b.dims is None else b.dims)
    if len(a.dims) != len(b.dims):
        raise ValueError(f"{where} differ in rank: {list(a.dims)} vs {list(b.dims)}")
    dims = []
    for x, y in zip(a.dims, b.dims):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            raise ValueError(f"{where} have incompatible shapes: {list(a.dims)} vs {list(b.dims)}")
        dims.append(x if isinstance(x, int) else y)
    return InputSpec(a.dtype, tuple(dims))


def _batches_to_run(
    models: Sequence[_Model], inputs: Mapping[str, InputSpec], requested: Sequence[int]
) -> tuple[list[int], list[str]]:
    """Batch sizes to time, and a note when fixed-batch models restrict them."""
    requested = list(dict.fromkeys(requested))
    fixed = fixed_batch(inputs)
    if fixed is None or requested == [fixed]:
        return requested, []
    owners = [m.name for m in models if fixed_batch(m.inputs) == fixed] or [m.name for m in models]
    note = (
        f"{', '.join(owners)} {'has' if len(owners) == 1 else 'have'} a fixed batch dimension of {fixed}: "
        f"running only at batch {fixed} (asked for {', '.join(map(str, requested))})"
    )
    return [fixed], [note]


# --------------------------------------------------------------------------- timing and statistics


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_alternating(
    runners: Sequence[Callable[[], Any]],
    warmup: int,
    rounds: int,
    min_time_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Per-runner latencies (ms); each round runs every runner once, in order."""
    for _ in range(warmup):
        for run in runners:
            run()
    times: list[list[float]] = [[] for _ in runners]
    totals = [0.0] * len(runners)
    max_rounds = rounds * _MIN_TIME_ROUND_FACTOR if min_time_s > 0 else rounds
    done = 0
    with _gc_paused():
        while done < rounds or (done < max_rounds and min(totals) < min_time_s):
            for i, run in enumerate(runners):
                start = clock()
                run()
                elapsed = clock() - start
                times[i].append(elapsed * 1e3)
                totals[i] += elapsed
            done += 1
    return times


def _median_ci_ranks(n: int) -> tuple[int, int]:
    """1-based ranks (k, n-k+1) of the distribution-free 95% interval for a median of n values."""
    # largest k with P(Bin(n, 1/2) <= k-1) <= 2.5%, in exact arithmetic (n may be in the thousands)
    limit = 2**n * _CI_TAIL
    k, cumulative = 0, 0
    while k < n and cumulative + math.comb(n, k) <= limit:
        cumulative += math.comb(n, k)
        k += 1
    k = max(k, 1)
    return k, n - k + 1


def _median_ci(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    low, high = _median_ci_ranks(len(ordered))
    return ordered[low - 1], ordered[high - 1]


def _ci_coverage(n: int) -> float:
    k, _ = _median_ci_ranks(n)
    return 1.0 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n  # int / int: no float overflow


def _timings(names: Sequence[str], times: Sequence[Sequence[float]]) -> list[Timing]:
    baseline = np.asarray(times[0])
    result = []
    for i, (name, model_times) in enumerate(zip(names, times)):
        values = np.asarray(model_times)
        ratio = ratio_ci = None
        if i > 0:
            ratios = values / baseline
            ratio = float(np.median(ratios))
            low, high = _median_ci(ratios.tolist())
            ratio_ci = (float(low), float(high))
        result.append(
            Timing(
                model=name,
                median_ms=float(np.median(values)),
                p90_ms=float(np.percentile(values, 90)),
                min_ms=float(values.min()),
                ratio=ratio,
                ratio_ci=ratio_ci,
            )
        )
    return result


class ReferenceTimer:
    """Latency ratios of candidate models to one reference on the CPU at batch 1: each candidate's
    session is timed alternately with the reference's, which is opened once for them all. The
    candidate sessions come from :meth:`session`, so the caller can use the same session for
    other work (the quality search scores each candidate in it)."""

    def __init__(self, reference: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 warmup: int = 5, rounds: int = 20) -> None:
        proto = ir.to_proto(reference)
        inputs = input_specs(proto, "the original model")
        self.feeds = random_feeds(inputs, feed_shapes(inputs, input_shapes, 1))
        self.threads = physical_cores()
        self.warmup, self.rounds = warmup, rounds
        self._reference = make_runner(timing_session(proto, "cpu", self.threads, "the original model"), self.feeds, "cpu")

    def session(self, model: ir.Model) -> ort.InferenceSession:
        return timing_session(model, "cpu", self.threads, "a candidate model")

    def ratio(self, session: ort.InferenceSession) -> float:
        """The median per-round latency ratio of ``session`` to the reference."""
        times = time_alternating([self._reference, make_runner(session, self.feeds, "cpu")], self.warmup, self.rounds)
        return _timings(("reference", "candidate"), times)[1].ratio


# --------------------------------------------------------------------------- environment


def _environment(config: BenchConfig, threads: int) -> dict[str, str]:
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "physical_cores": str(physical_cores()),
        "providers": ",".join(config.providers),
        "threads": str(threads),
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "execution_mode": "ORT_SEQUENTIAL",
        "intra_op_spinning": "off",
        "timing": "alternating rounds, one run per model per round, perf_counter around each run",
        "ratio_ci": "95% distribution-free order-statistics interval for the median of per-round ratios",
    }
    if any(p != "cpu" for p in config.providers):
        env["gpu"] = gpu_name(DEVICE_ID)
        env["cudnn_conv_algo_search"] = config.cudnn_conv_algo_search
        env["io_binding"] = f"inputs and outputs bound on cuda:{DEVICE_ID}"
    return env


# --------------------------------------------------------------------------- benchmark


def _check_config(config: BenchConfig) -> None:
    if not config.providers:
        raise ValueError("no providers requested")
    for provider in config.providers:
        require_provider(provider)
    if not config.batches or any(b < 1 for b in config.batches):
        raise ValueError(f"batch sizes must be positive integers, got {list(config.batches)}")
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads must be positive, got {config.threads}")
    if config.rounds < 1 or config.warmup < 0 or config.min_time_s < 0:
        raise ValueError("rounds must be >= 1, warmup >= 0 and min_time_s >= 0")
    if config.cudnn_conv_algo_search not in ALGO_SEARCH_CHOICES:
        raise ValueError(
            f"cudnn_conv_algo_search must be one of {', '.join(ALGO_SEARCH_CHOICES)}, "
            f"got {config.cudnn_conv_algo_search!r}"
        )


def _warn(warnings: list[str], message: str) -> None:
    logger.warning(message)
    warnings.append(message)


@dataclass(frozen=True)
class _Plan:
    """What every provider runs: the models, their merged inputs, the batches and the thread count."""

    models: list[_Model]
    inputs: dict[str, InputSpec]
    batches: list[int]
    notes: list[str]  # warnings shared by all cases
    threads: int
    config: BenchConfig


def _plan(models: Sequence[str | Path | onnx.ModelProto], names: Sequence[str] | None, config: BenchConfig) -> _Plan:
    if not models:
        raise ValueError("no models to benchmark")
    if names is not None and len(names) != len(models):
        raise ValueError(f"got {len(names)} names for {len(models)} models")
    loaded = [_load_model(model, f"model{i}") for i, model in enumerate(models)]
    labels = list(names) if names is not None else _unique_names([m.name for m in loaded])
    loaded = [_Model(label, m.source, m.inputs) for label, m in zip(labels, loaded)]
    inputs = _merge_inputs(loaded)
    batches, notes = _batches_to_run(loaded, inputs, config.batches)
    for batch in batches:  # fail on missing shapes before any session is built
        feed_shapes(inputs, config.input_shapes, batch)
    for note in notes:
        logger.warning(note)
    return _Plan(loaded, inputs, batches, notes, config.threads or physical_cores(), config)


def _open_sessions(plan: _Plan, provider: str, trt_cache_dir: str | None) -> list[ort.InferenceSession]:
    return [
        timing_session(model.source, provider, plan.threads, model.name, trt_cache_dir=trt_cache_dir,
                       cudnn_conv_algo_search=plan.config.cudnn_conv_algo_search)
        for model in plan.models
    ]


def _provider_cases(plan: _Plan, provider: str, trt_cache_dir: str | None) -> list[BenchCase]:
    """All batch sizes on one provider; the sessions are freed on return."""
    sessions = _open_sessions(plan, provider, trt_cache_dir)
    notes = list(plan.notes)
    for model, session in zip(plan.models, sessions):
        placement = _placement_warning(model.name, session, provider)
        if placement is not None:
            _warn(notes, placement)
    return [_run_case(plan, sessions, provider, batch, notes) for batch in plan.batches]


def _run_case(
    plan: _Plan, sessions: Sequence[ort.InferenceSession], provider: str, batch: int, notes: Sequence[str]
) -> BenchCase:
    config = plan.config
    shapes = feed_shapes(plan.inputs, config.input_shapes, batch)
    feeds = random_feeds(plan.inputs, shapes)
    runners = [make_runner(session, feeds, provider) for session in sessions]
    times = time_alternating(runners, config.warmup, config.rounds, config.min_time_s)
    warnings = list(notes)
    rounds = len(times[0])
    if len(plan.models) > 1 and _ci_coverage(rounds) < 1 - 2 * float(_CI_TAIL):
        _warn(
            warnings,
            f"{provider} batch {batch}: with {rounds} rounds the ratio interval is [min, max] "
            f"with only {_ci_coverage(rounds):.1%} coverage; use at least 6 rounds for 95%",
        )
    return BenchCase(
        provider=provider,
        batch=batch,
        threads=plan.threads,
        timings=_timings([m.name for m in plan.models], times),
        warnings=warnings,
        input_shapes={name: list(shape) for name, shape in shapes.items()},
    )


def benchmark(
    models: Sequence[str | Path | onnx.ModelProto],
    config: BenchConfig = BenchConfig(),
    names: Sequence[str] | None = None,
) -> BenchResult:
    """Time ``models`` alternately on every requested provider and batch size.

    Ratios and intervals are relative to the first model.  Raises ValueError
    (one line) for unavailable providers, unreadable models, incompatible
    input signatures or symbolic dimensions without ``config.input_shapes``.
    """
    _check_config(config)
    plan = _plan(models, names, config)
    cases = []
    trt_cache = tempfile.TemporaryDirectory(prefix="basisprune-trt-") if "tensorrt" in config.providers else None
    with trt_cache or contextlib.nullcontext():
        for provider in config.providers:
            cases += _provider_cases(plan, provider, trt_cache.name if trt_cache else None)
    return BenchResult(environment=_environment(config, plan.threads), config=config, cases=cases)


# --------------------------------------------------------------------------- output


def format_bench(result: BenchResult) -> str:
    """Plain-text table: provider, batch, model, median, p90, min, ratio [95% CI]; then warnings."""
    env = result.environment
    device = f"GPU {env['gpu']}, " if "gpu" in env else ""
    lines = [
        f"onnxruntime {env.get('onnxruntime', '?')} | {device}CPU {env.get('cpu', '?')} "
        f"({env.get('physical_cores', '?')} cores) | {env.get('date', '?')}"
    ]
    header = ("provider", "batch", "threads", "model", "median ms", "p90 ms", "min ms", "ratio [95% CI]")
    rows = [header]
    for case in result.cases:
        for t in case.timings:
            ratio = "" if t.ratio is None else f"{t.ratio:.3f}"
            if t.ratio_ci is not None:
                ratio += f" [{t.ratio_ci[0]:.3f}, {t.ratio_ci[1]:.3f}]"
            rows.append(
                (case.provider, str(case.batch), str(case.threads), t.model,
                 f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.min_ms:.3f}", ratio)
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {1, 2, 4, 5, 6}
    for row in rows:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    warnings = list(dict.fromkeys(w for case in result.cases for w in case.warnings))
    lines.extend(f"warning: {w}" for w in warnings)
    return "\n".join(lines)
