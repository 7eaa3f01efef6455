"""Whole-model size and compute: parameters (elements of constant tensors) and MACs at batch 1.

MACs need the input size: a model with symbolic height/width and no ``input_shapes`` has
``macs=None`` (unknown), never a number counted at a guessed size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .shapes import ShapeTable, infer_shapes

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int | None  # None: unknown at a symbolic input size


def count_params(model: ir.Model) -> int:
    """Elements of every constant tensor: initializers and Constant nodes' values."""
    total = sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values() if v.const_value is not None)
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            total += int(np.prod(node.attributes["value"].as_tensor().shape))
    return total


def node_macs(node: ir.Node, shapes: ShapeTable) -> int:
    """Multiply-accumulates of one compute node at batch 1 (0 when shapes are unknown)."""
    out = shapes.get(node.outputs[0])
    inp = shapes.get(node.inputs[0])
    weight = shapes.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        weight = tuple(node.inputs[1].const_value.shape)
    if out is None or weight is None:
        return 0
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    if node.op_type == "ConvTranspose":
        return 0 if inp is None else int(np.prod(inp)) * int(np.prod(weight[1:]))
    if node.op_type == "Gemm":
        k = weight[1] if node.attributes.get_int("transB", 0) else weight[0]
        return int(np.prod(out)) * k
    return int(np.prod(out)) * (weight[-2] if len(weight) >= 2 else 1)


def model_cost(model: ir.Model, shapes: ShapeTable | None = None) -> ModelCost:
    shapes = shapes if shapes is not None else infer_shapes(model)
    compute = [node for node in model.graph if node.op_type in COMPUTE_OPS and node.domain in ("", "ai.onnx")]
    macs = sum(node_macs(node, shapes) for node in compute) if shapes.sized else None
    return ModelCost(params=count_params(model), macs=macs)
