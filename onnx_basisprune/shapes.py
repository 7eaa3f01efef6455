"""Concrete tensor shapes at batch 1, for the cost model (MACs) and the report.

Shapes come from ONNX shape inference on a light copy of the model (large initializers carry
their dims only), with each graph input's symbolic batch dimension set to 1. Other symbolic
dimensions must be given by the user (``input_shapes``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from .errors import BasisPruneError

_KEEP_DATA_LIMIT = 1024  # initializers up to this many elements keep their data (shape constants)


class ShapeTable:
    """Value name -> dims as far as shape inference could tell (-1 where it could not)."""

    def __init__(self, dims: Mapping[str, tuple[int, ...]]):
        self._dims = dict(dims)

    def get(self, value: ir.Value | None) -> tuple[int, ...] | None:
        """Dims at batch 1 (an unknown leading dim is the batch), or None if any other is unknown."""
        if value is None or value.name is None or value.name not in self._dims:
            return None
        dims = self._dims[value.name]
        if dims and dims[0] < 0:
            dims = (1, *dims[1:])
        return None if any(d < 0 for d in dims) else dims


def input_shapes(model: ir.Model, overrides: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every real graph input: batch 1 for a symbolic first dim, else ``overrides``."""
    overrides = overrides or {}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if value.name in overrides:
            shapes[value.name] = tuple(int(d) for d in overrides[value.name])
            continue
        if value.shape is None:
            raise BasisPruneError(f"input '{value.name}' has no shape; give it with --input-shape {value.name}=1x3x224x224")
        dims = [d if isinstance(d, int) else None for d in value.shape]
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            raise BasisPruneError(
                f"input '{value.name}' has symbolic dims {list(value.shape)}; give them with --input-shape {value.name}=1x3x224x224"
            )
        shapes[value.name] = tuple(dims)
    return shapes


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
                dim.Clear()
                dim.dim_value = size
    return proto


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def infer_shapes(model: ir.Model, overrides: Mapping[str, Sequence[int]] | None = None) -> ShapeTable:
    """Dims of every value that shape inference reaches, with the inputs fixed at batch 1.

    Shape subgraphs (Shape -> Gather -> Concat -> Pad, as in TF-style "same" padding) are
    constant-folded first on the light copy, so the shapes behind them are known too.
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
        common.ShapeInferencePass()(light)
    except Exception as exc:  # onnx raises several types here
        raise BasisPruneError(f"shape inference failed: {str(exc).splitlines()[0]}") from None
    dims: dict[str, tuple[int, ...]] = dict(inputs)
    for node in light.graph:
        for value in node.outputs:
            if value.shape is not None and value.name:
                dims[value.name] = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return ShapeTable(dims)
