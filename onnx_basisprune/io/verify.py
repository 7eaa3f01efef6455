"""The check every written model passes first: ``onnx.checker`` (full check, strict shape
inference), onnxruntime loads it, and an exact rewrite computes what the original computes.

An exact rewrite (a full-rank split) is run against its reference on the same random inputs and
every floating-point output must agree to :data:`TOLERANCE` (max |a - b| / max |a|), or to the
float32 noise of the original's output where that is larger (:data:`NOISE_FACTOR`). Inputs take
the model's dims, the batch dim at 1 and the user's ``input_shapes`` where given; any other
symbolic dim is :data:`SYMBOLIC_SIZE`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..errors import BasisPruneError
from ..runtime.session import input_specs, new_session, one_line, random_feeds

TOLERANCE = 1e-4
# Some outputs carry float32 noise far above TOLERANCE (e.g. a sigmoid map near 0 on random
# inputs): there a rewrite may differ at most NOISE_FACTOR times as much as the original's own
# outputs move when its inputs change by the relative INPUT_JITTER (a few float32 steps).
NOISE_FACTOR = 10
INPUT_JITTER = 2.0**-20
SYMBOLIC_SIZE = 64  # a multiple of the usual strides (32) for symbolic height/width


def verify_model(
    model: ir.Model, reference: ir.Model | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> None:
    """Raise a one-line :class:`BasisPruneError` unless ``model`` is valid, loads in onnxruntime
    and, given the model it must equal, computes the same outputs. Tensors still read lazily
    from an external data file are brought into memory."""
    ir.external_data.load_to_model(model)
    proto = ir.to_proto(model)
    _check(proto)
    try:
        candidate = new_session(model)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BasisPruneError(f"onnxruntime cannot load the output model, nothing written: {one_line(exc)}") from None
    if reference is not None:
        ir.external_data.load_to_model(reference)
        _compare(candidate, new_session(reference), _random_feeds(proto, input_shapes or {}))


def check_file(path: str | os.PathLike) -> None:
    """``onnx.checker`` (full check) on a written model file, for models too large to hold in
    one protobuf message (over 2 GB): onnxruntime and the comparison need them in memory."""
    _check(str(path))


def _check(model: onnx.ModelProto | str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BasisPruneError(f"the output model is invalid, nothing written: {one_line(exc)}") from None


def _random_feeds(proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    inputs = input_specs(proto, "the output model")
    shapes = {}
    for name, spec in inputs.items():
        if name in input_shapes:
            shapes[name] = tuple(int(d) for d in input_shapes[name])
        elif spec.dims is None:
            raise BasisPruneError(f"input '{name}' has no shape: give it with --input-shape {name}=1x3x224x224")
        else:
            shapes[name] = tuple(
                d if isinstance(d, int) and d >= 0 else 1 if axis == 0 else SYMBOLIC_SIZE for axis, d in enumerate(spec.dims)
            )
    return random_feeds(inputs, shapes)


def _compare(candidate: ort.InferenceSession, reference: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> None:
    """Every floating-point output of ``candidate`` within :data:`TOLERANCE` of ``reference``'s,
    or within :data:`NOISE_FACTOR` times what a jitter of the inputs moves the reference by."""
    shapes = ", ".join(f"{name}={'x'.join(map(str, x.shape))}" for name, x in feeds.items())
    expected = _outputs(reference, feeds, f"the original model does not run at {shapes} (give --input-shape)")
    jittered = _outputs(reference, {k: _jitter(x) for k, x in feeds.items()}, "the original model does not run")
    got = _outputs(candidate, feeds, "onnxruntime cannot run the output model, nothing written")
    for output, want, have, noisy in zip(candidate.get_outputs(), expected, got, jittered):
        if want.shape != have.shape:
            raise BasisPruneError(f"output '{output.name}' has shape {list(have.shape)}, the original's {list(want.shape)}; nothing written")
        if want.dtype.kind != "f":
            continue
        error, allowed = _relative_error(want, have), max(TOLERANCE, NOISE_FACTOR * _relative_error(want, noisy))
        if not error <= allowed:
            raise BasisPruneError(
                f"output '{output.name}' differs from the original's: max relative error {error:.3g} > {allowed:.3g}; nothing written"
            )


def _outputs(runner: ort.InferenceSession, feeds: dict[str, np.ndarray], failure: str) -> list[np.ndarray]:
    try:
        return [np.asarray(x) for x in runner.run(None, feeds)]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BasisPruneError(f"{failure}: {one_line(exc)}") from None


def _jitter(x: np.ndarray) -> np.ndarray:
    return (x * (1 + INPUT_JITTER)).astype(x.dtype) if x.dtype.kind == "f" else x


def _relative_error(want: np.ndarray, have: np.ndarray) -> float:
    """max |want - have| / max |want| in float64; equal entries (also inf, NaN) count 0."""
    want, have = want.astype(np.float64), have.astype(np.float64)
    same = (want == have) | (np.isnan(want) & np.isnan(have))
    diff = np.where(same, 0.0, np.abs(want - have))
    finite = np.abs(want[np.isfinite(want)])
    scale = finite.max() if finite.size and finite.max() > 0 else 1.0
    return float(diff.max() / scale) if diff.size else 0.0
