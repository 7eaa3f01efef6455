"""onnxruntime sessions: the one factory every stage uses, the execution providers it can ask
for, what the models are fed, and the runners that time them.

:func:`new_session` makes every session of the package (quality evaluation, the checks of written
models, timing); :func:`timing_session` is the one set up for timing, with one-line errors.
:func:`available_providers` tries CUDA and TensorRT for real: onnxruntime-gpu lists them even
without a GPU. :func:`input_specs`, :func:`feed_shapes` and :func:`random_feeds` turn a model's
graph inputs into concrete random feeds; :func:`make_runner` binds them on the provider's device
(CUDA I/O binding, so host-device copies are not timed).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

EP_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
DISPLAY_NAMES = {"cpu": "CPU", "cuda": "CUDA", "tensorrt": "TensorRT"}
ALGO_SEARCH_CHOICES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
DEFAULT_ALGO_SEARCH = "EXHAUSTIVE"
DEVICE_ID = 0

Dim = int | str | None  # fixed size, symbolic name, or unnamed unknown
ModelSource = ir.Model | onnx.ModelProto | bytes | str | os.PathLike


# --------------------------------------------------------------------------- providers


def available_providers() -> list[str]:
    """Short names ("cpu", "cuda", "tensorrt") of the providers that really work here.

    onnxruntime-gpu lists CUDA and TensorRT even without a GPU or CUDA
    libraries, so each one is tried: a tiny session is created and run, and
    the provider counts only if the session really uses it.
    """
    return [name for name in EP_NAMES if _provider_problem(name) is None]


@lru_cache(maxsize=None)
def _provider_problem(provider: str) -> str | None:
    """None if ``provider`` works, else a one-line reason."""
    ep = EP_NAMES[provider]
    if ep not in ort.get_available_providers():
        return f"this onnxruntime {ort.__version__} build does not include {ep}"
    if provider == "cpu":
        return None
    with _captured_stderr() as log:
        problem = _probe(provider)
    if problem is None:
        return None
    cause = _log_failure("".join(log))
    return f"{problem.rstrip('.')}; {cause}" if cause else problem


def _probe(provider: str) -> str | None:
    """Create and run a tiny session on ``provider``: None if it really ran there, else why not."""
    try:
        session = new_session(_probe_model(), provider, threads=1, timed=True)
        session.run(None, {"x": np.ones((1, 4), np.float32)})
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return one_line(exc)
    used = session.get_providers()
    return None if used[0] == EP_NAMES[provider] else f"a session asking for {EP_NAMES[provider]} got {used}"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture file descriptor 2 (where onnxruntime's C++ logger writes); the text is in the list on exit."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def _log_failure(log: str) -> str | None:
    """The first "Failed ..." message of an onnxruntime log, without prefix and colours."""
    for line in log.splitlines():
        message = re.sub(r"\x1b\[[0-9;]*m", "", line).split("] ", 1)[-1].strip()
        if message.startswith("[ONNXRuntimeError]") or "Failed" not in message:
            continue
        return message.split("with error: ", 1)[-1]
    return None


def _probe_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def require_provider(provider: str) -> None:
    """Raise a one-line ValueError unless ``provider`` is known and really works here."""
    if provider not in EP_NAMES:
        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(EP_NAMES)}")
    problem = _provider_problem(provider)
    if problem is not None:
        raise ValueError(f"{DISPLAY_NAMES[provider]} execution provider is not available: {problem}")


# --------------------------------------------------------------------------- sessions


def _provider_list(
    provider: str, cudnn_conv_algo_search: str, trt_cache_dir: str | None
) -> list[str | tuple[str, dict[str, str]]]:
    cuda = (EP_NAMES["cuda"], {"device_id": str(DEVICE_ID), "cudnn_conv_algo_search": cudnn_conv_algo_search})
    if provider == "cuda":
        return [cuda, EP_NAMES["cpu"]]
    if provider == "tensorrt":
        trt_options = {"device_id": str(DEVICE_ID)}
        if trt_cache_dir is not None:
            trt_options |= {"trt_engine_cache_enable": "True", "trt_engine_cache_path": trt_cache_dir}
        return [(EP_NAMES["tensorrt"], trt_options), cuda, EP_NAMES["cpu"]]
    return [EP_NAMES["cpu"]]


def new_session(
    model: ModelSource,
    provider: str = "cpu",
    threads: int | None = None,
    *,
    timed: bool = False,
    trt_cache_dir: str | None = None,
    cudnn_conv_algo_search: str = DEFAULT_ALGO_SEARCH,
) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` on ``provider``: every session of the package is made
    here. All use ``ORT_ENABLE_ALL``, log errors only, ``threads`` intra-op threads (onnxruntime's
    default when None) and never fall back to the CPU silently. ``timed`` sets a session up for
    timing alternately with others (see :mod:`.bench`): sequential execution, one inter-op thread,
    no spinning, and the record of node placement."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; placement is checked by the timing code
    if threads:
        options.intra_op_num_threads = threads
    if timed:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return ort.InferenceSession(
        _source(model),
        options,
        providers=_provider_list(provider, cudnn_conv_algo_search, trt_cache_dir),
        enable_fallback=0,  # never silently retry on the CPU
    )


def timing_session(
    model: ModelSource,
    provider: str,
    threads: int,
    label: str,
    *,
    trt_cache_dir: str | None = None,
    cudnn_conv_algo_search: str = DEFAULT_ALGO_SEARCH,
) -> ort.InferenceSession:
    """A ``timed`` :func:`new_session` of ``model`` (called ``label`` in errors), with a one-line
    ValueError when onnxruntime cannot load it or does not run it on ``provider``."""
    try:
        session = new_session(model, provider, threads, timed=True, trt_cache_dir=trt_cache_dir,
                              cudnn_conv_algo_search=cudnn_conv_algo_search)
    except Exception as exc:  # noqa: BLE001 - report any onnxruntime load failure in one line
        raise ValueError(f"onnxruntime cannot load {label} on {provider}: {one_line(exc)}") from None
    if session.get_providers()[0] != EP_NAMES[provider]:
        raise ValueError(
            f"{DISPLAY_NAMES[provider]} execution provider is not available: "
            f"session for {label} got {session.get_providers()}"
        )
    return session


def _source(model: ModelSource) -> str | bytes:
    """What ``InferenceSession`` loads: serialized bytes, or the path (keeps external data working)."""
    if isinstance(model, ir.Model):
        return ir.to_proto(model).SerializeToString()
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return model if isinstance(model, bytes) else str(model)


class _BoundRunner:
    """One inference with inputs and outputs bound on the GPU (I/O binding): no host copies are timed."""

    def __init__(self, session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> None:
        self._session = session
        self._binding = session.io_binding()
        self._inputs = {  # kept here so the device buffers live as long as the binding
            name: ort.OrtValue.ortvalue_from_numpy(array, "cuda", DEVICE_ID) for name, array in feeds.items()
        }
        for name, value in self._inputs.items():
            self._binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            self._binding.bind_output(output.name, "cuda", DEVICE_ID)
        self._binding.synchronize_inputs()

    def __call__(self) -> None:
        self._session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()


def make_runner(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], provider: str) -> Callable[[], Any]:
    """A no-argument callable running one inference, inputs/outputs on the provider's device."""
    if provider == "cpu":
        return lambda: session.run(None, feeds)
    return _BoundRunner(session, feeds)


_ORT_SOURCE_PREFIX = re.compile(
    r"(\[ONNXRuntimeError\] : \d+ : \w+ : )?(\S+\.(cc|cpp|h):\d+ [^(]*\((?:[^()]|\([^()]*\))*\) )?"
)


def one_line(exc: BaseException) -> str:
    """First line of an error message, without onnxruntime's source location and C++ signature."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return _ORT_SOURCE_PREFIX.sub("", lines[0], count=1).strip() or lines[0]


# --------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class InputSpec:
    """A real graph input as onnxruntime is fed it: dtype and dims."""

    dtype: np.dtype
    dims: tuple[Dim, ...] | None  # None: rank unknown


def input_specs(model: onnx.ModelProto, label: str) -> dict[str, InputSpec]:
    """Every graph input that is not an initializer (``label`` names the model in errors)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise ValueError(f"{label}: input {value.name!r} is not a tensor; only tensor inputs are supported")
        tensor = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        if dtype.kind not in "biuf":
            raise ValueError(f"{label}: input {value.name!r} has unsupported dtype {dtype}")
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(_dim(d) for d in tensor.shape.dim)
        specs[value.name] = InputSpec(dtype, dims)
    return specs


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None


def fixed_batch(inputs: Mapping[str, InputSpec]) -> int | None:
    """The batch size fixed by the models, or None if some input's batch dimension is symbolic."""
    if any(spec.dims is None for spec in inputs.values()):
        return None  # unknown rank: its shape comes from input_shapes, batch dimension symbolic
    first_dims = [spec.dims[0] for spec in inputs.values() if spec.dims]
    if not first_dims or not all(isinstance(d, int) for d in first_dims):
        return None
    return first_dims[0]


def _resolve_shape(name: str, spec: InputSpec, override: Sequence[int] | None, batch: int) -> tuple[int, ...]:
    """Concrete shape: fixed dims kept, symbolic batch dim = batch, other symbolic dims from the override."""
    if spec.dims is None and override is None:
        raise ValueError(f"input {name!r} has no shape in the model: give it with input_shapes / --input-shape")
    dims = spec.dims if spec.dims is not None else (None,) * len(override or ())
    if override is not None and len(override) != len(dims):
        raise ValueError(f"input_shape for {name!r} has rank {len(override)}, the model's input has rank {len(dims)}")
    shape = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int):
            if override is not None and override[axis] != dim:
                raise ValueError(f"input_shape for {name!r} conflicts with the model's fixed shape {list(dims)}")
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
        elif override is not None:
            shape.append(int(override[axis]))
        else:
            raise ValueError(
                f"input {name!r} has symbolic dimension {axis} ({dim or '?'}) in {list(dims)}: "
                f"give its shape with input_shapes={{{name!r}: [...]}} or --input-shape {name}=1x..."
            )
    return tuple(shape)


def feed_shapes(
    inputs: Mapping[str, InputSpec], overrides: Mapping[str, Sequence[int]] | None, batch: int
) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every input at ``batch``: fixed dims kept, a symbolic batch dim set to
    ``batch``, other symbolic dims from ``overrides``; a one-line ValueError where none is known."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(inputs))
    if unknown:
        raise ValueError(f"input_shapes names {unknown} that are not model inputs {sorted(inputs)}")
    return {name: _resolve_shape(name, spec, overrides.get(name), batch) for name, spec in inputs.items()}


def random_feeds(
    inputs: Mapping[str, InputSpec], shapes: Mapping[str, tuple[int, ...]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Reproducible random inputs of the given shapes in each input's dtype."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, spec in inputs.items():
        shape = shapes[name]
        if spec.dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[name] = rng.random(shape) < 0.5
        else:  # small non-negative integers are valid indices for most index inputs
            feeds[name] = rng.integers(0, 10, shape).astype(spec.dtype)
    return feeds
