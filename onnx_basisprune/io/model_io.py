"""Loading and saving models safely: clear errors for bad files, atomic writes, external data.

The input file is only ever read. A model is written only once it passes
:func:`.verify.verify_model` (onnx.checker, onnxruntime, and the reference's outputs for an exact
rewrite). Output goes to a temporary folder beside the destination and is renamed into place
once complete, so a failure never leaves a half-written model behind. Models whose tensors
exceed protobuf's 2 GB limit are saved with their weights in ``<name>.data``; those are too large
to check in memory, so the written file gets ``onnx.checker`` (full check) before the rename.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ..errors import BasisPruneError
from .verify import check_file, verify_model

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of tensor data above which weights go external


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read and check an ONNX file; raise :class:`BasisPruneError` with one line on any problem."""
    path = Path(path)
    if not path.exists():
        raise BasisPruneError(f"{path}: no such file")
    if not path.is_file():
        raise BasisPruneError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise BasisPruneError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise BasisPruneError(f"{path}: not an ONNX model (no graph)")
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, OSError, ValueError) as exc:
        raise BasisPruneError(f"{path}: the model fails onnx.checker: {_first_line(exc)}") from None
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    reference: ir.Model | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically, once it is verified (against ``reference`` when
    it must compute the same function); return the files written (model, external data)."""
    path = Path(path)
    if path.is_dir():
        raise BasisPruneError(f"{path}: output path is a directory")
    if not path.parent.is_dir():
        raise BasisPruneError(f"{path}: output folder {path.parent} does not exist")
    external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external:
        verify_model(model, reference, input_shapes)
    data_name = path.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".basisprune-", dir=path.parent))
    except OSError as exc:
        raise BasisPruneError(f"{path}: cannot write the output ({exc.strerror})") from None
    try:
        tmp_model = tmp_dir / path.name
        if not external:
            # Tensors still read lazily from the input's data file would be saved as references
            # to that file (relative to the input's folder): bring them into the model file.
            ir.external_data.load_to_model(model)
        ir.save(model, tmp_model, external_data=data_name if external else None)
        if external:
            check_file(tmp_model)
        written = [path]
        if external:
            os.replace(tmp_dir / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(tmp_model, path)
        return written
    except OSError as exc:
        raise BasisPruneError(f"{path}: cannot write the output ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
