"""Concrete tensor shapes at batch 1, for the cost model (MACs) and the report.

Shapes come from ONNX shape inference on a light copy of the model (large initializers carry
their dims only), with each graph input's symbolic batch dimension set to 1. Other symbolic
dimensions (e.g. height and width) come from the user (``input_shapes``) or stay unknown: the
values downstream of them have no concrete shape, so MACs are unknown too (:func:`unsized_inputs`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from ..errors import BasisPruneError

_INFERENCE_LOG = logging.getLogger(common.ShapeInferencePass.__module__)  # logs failures with a traceback
_KEEP_DATA_LIMIT = 1024  # initializers up to this many elements keep their data (shape constants)


class ShapeTable:
    """Value name -> dims as far as shape inference could tell (-1 where it could not).

    ``sized``: every real input had a concrete size; when not, MACs are unknown."""

    def __init__(self, dims: Mapping[str, tuple[int, ...]], sized: bool):
        self._dims = dict(dims)
        self.sized = sized

    def get(self, value: ir.Value | None) -> tuple[int, ...] | None:
        """Dims at batch 1 (an unknown leading dim is the batch), or None if any other is unknown."""
        if value is None or value.name is None or value.name not in self._dims:
            return None
        dims = self._dims[value.name]
        if dims and dims[0] < 0:
            dims = (1, *dims[1:])
        return None if any(d < 0 for d in dims) else dims


def input_shapes(model: ir.Model, overrides: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every real graph input: ``overrides`` where given, else the model's dims with a
    symbolic first (batch) dim set to 1 and other symbolic dims -1 (unknown); inputs of unknown
    rank are left out."""
    overrides = overrides or {}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if value.name in overrides:
            shapes[value.name] = tuple(int(d) for d in overrides[value.name])
        elif value.shape is not None:
            dims = [d if isinstance(d, int) else -1 for d in value.shape]
            if dims and dims[0] < 0:
                dims[0] = 1
            shapes[value.name] = tuple(dims)
    return shapes


def unsized_inputs(model: ir.Model, overrides: Mapping[str, Sequence[int]] | None = None) -> list[ir.Value]:
    """The real inputs whose size is not concrete (symbolic non-batch dims, or no shape)."""
    known = input_shapes(model, overrides)
    return [
        v for v in model.graph.inputs
        if not v.is_initializer() and (v.name not in known or min(known[v.name], default=0) < 0)
    ]


def require_input_sizes(model: ir.Model, overrides: Mapping[str, Sequence[int]] | None, purpose: str) -> None:
    """Raise :class:`BasisPruneError` when ``purpose`` (e.g. "a MACs target") needs input sizes
    that neither the model nor ``overrides`` give."""
    unsized = unsized_inputs(model, overrides)
    if unsized:
        value = unsized[0]
        dims = list(value.shape) if value.shape is not None else [1, 3, 224, 224]
        example = "x".join(str(d) if isinstance(d, int) else "1" if i == 0 else "224" for i, d in enumerate(dims))
        what = f"symbolic dims [{', '.join(map(str, dims))}]" if value.shape is not None else "no shape"
        raise BasisPruneError(
            f"{purpose} needs the input size, and input '{value.name}' has {what}: give it with --input-shape {value.name}={example}"
        )


def _light_proto(model: ir.Model, inputs: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    proto = ir.to_proto(model)
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or _numel(init.dims) > _KEEP_DATA_LIMIT:
            # Dims and type are all shape inference needs of a weight; drop the data.
            init.CopyFrom(onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
    for value_info in proto.graph.input:
        if value_info.name in inputs:
            shape = value_info.type.tensor_type.shape
            for dim, size in zip(shape.dim, inputs[value_info.name]):
                if size >= 0:
                    dim.Clear()
                    dim.dim_value = size
    return proto


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


@contextlib.contextmanager
def _silenced(logger: logging.Logger) -> Iterator[None]:
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def infer_shapes(model: ir.Model, overrides: Mapping[str, Sequence[int]] | None = None) -> ShapeTable:
    """Dims of every value that shape inference reaches, with the inputs fixed at batch 1.

    Shape subgraphs (Shape -> Gather -> Concat -> Pad, as in TF-style "same" padding) are
    constant-folded first on the light copy, so the shapes behind them are known too. Where the
    whole-model inference fails (an invalid rewrite, which the save check reports), the shapes
    from the folding stay; its failure is not logged.
    """
    inputs = input_shapes(model, overrides)
    light = ir.from_proto(_light_proto(model, inputs))
    try:
        FoldConstantsPass(
            shape_inference=True,
            input_size_limit=_KEEP_DATA_LIMIT,
            output_size_limit=_KEEP_DATA_LIMIT,
            should_fold=lambda node: True if node.op_type == "ConstantOfShape" else None,
        )(light)
        with _silenced(_INFERENCE_LOG):
            common.ShapeInferencePass()(light)
    except Exception as exc:  # onnx raises several types here
        raise BasisPruneError(f"shape inference failed: {str(exc).splitlines()[0]}") from None
    dims: dict[str, tuple[int, ...]] = dict(inputs)
    for node in light.graph:
        for value in node.outputs:
            if value.shape is not None and value.name:
                dims[value.name] = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return ShapeTable(dims, sized=not unsized_inputs(model, overrides))
