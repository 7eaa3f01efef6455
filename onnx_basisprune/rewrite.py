"""The graph rewrite: each layer becomes a basis/scaling pair, a recomposed node, or stays.

:class:`ApplyDecisionsPass` is an onnx_ir in-place pass. For a ``decomposed`` layer it replaces the
node by a *basis* node (the kept rows of V^T as filters: same kernel, strides, pads, dilations and
groups, no bias) followed by a *scaling* node (1x1 Conv, grouped the same way, or a matrix
product) holding ``U diag(S)`` and the original bias. For ``recomposed`` it swaps the weight for
the truncated ``U_r S_r V_r^T``. Nodes carry metadata so a saved model still tells which pair
belongs to which original layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from . import svd as svdlib
from .layers import Layer

ACTIONS = ("decomposed", "recomposed", "kept", "skipped")
META_ROLE = "basisprune.role"
META_LAYER = "basisprune.layer"
META_FULL_RANK = "basisprune.full_rank"
META_KEPT_RANK = "basisprune.kept_rank"
META_SINGULAR_VALUES = "basisprune.singular_values"


@dataclass
class Decision:
    """What happens to one layer; ``keep`` holds the kept basis indices per group (groups, r)."""

    action: str
    reason: str
    keep: np.ndarray | None = None

    @property
    def rank(self) -> int | None:
        return None if self.keep is None else int(self.keep.shape[1])


def _unique_value_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... if a value of the graph already has that name."""
    taken = {v.name for v in graph.inputs} | set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    name = _unique_value_name(graph, name)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _copy_attrs(node: ir.Node, **overrides: ir.Attr) -> list[ir.Attr]:
    attrs = {name: ir.Attr(name, attr.type, attr.value) for name, attr in node.attributes.items()}
    attrs.update(overrides)
    return list(attrs.values())


def _metadata(layer: Layer, role: str, rank: int) -> dict[str, str]:
    meta = {META_ROLE: role, META_LAYER: layer.name, META_FULL_RANK: str(layer.full_rank), META_KEPT_RANK: str(rank)}
    if role == "scaling":
        meta[META_SINGULAR_VALUES] = json.dumps(np.round(layer.svd.s, 8).tolist())
    return meta


def _bias_value(node: ir.Node) -> np.ndarray | None:
    """The constant bias (Conv B, Gemm C), None when absent; raises if it is not constant."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    return node.inputs[2].const_value.numpy()


def _compensates_bias(layer: Layer, node: ir.Node) -> bool:
    """Whether dropped bases' means can go into the bias (needs a constant or absent bias)."""
    if layer.op == "MatMul":
        return False
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    return not has_bias or node.inputs[2].const_value is not None


def scaling_and_bias_change(layer: Layer, node: ir.Node, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Scaling matrix (g, out_g, r) for the kept bases and the bias change (C_out,) or None.

    Without calibration statistics this is the plain truncation ``U_K S_K``; with them, the
    least-squares fit that best reproduces the full layer (dropped bases folded into the rest
    and, where the node has a constant or no bias, their means into the bias).
    """
    if layer.stats is None:
        return svdlib.scaling_matrix(layer.svd, keep), None
    with_bias = _compensates_bias(layer, node)
    scaling, delta = svdlib.least_squares_scaling(layer.svd, keep, layer.stats, with_bias)
    return scaling, delta.reshape(-1) if with_bias else None


def add_to_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray, dtype: np.dtype) -> None:
    """Add ``delta`` to the node's bias input (creating it when absent)."""
    old = _bias_value(node)
    if node.op_type == "Gemm":
        beta = node.attributes.get_float("beta", 1.0)
        bias = delta if old is None else beta * old.astype(np.float64) + delta
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    else:
        bias = delta if old is None else old.astype(np.float64) + delta
    value = new_initializer(graph, f"{node.name}.bias", np.asarray(bias).astype(dtype))
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)


def _pair_weights(layer: Layer, keep: np.ndarray, scaling: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(basis weight, scaling weight) in the node layout of ``layer.op``."""
    rank = keep.shape[1]
    if layer.op == "Conv":
        spatial = len(layer.weight_shape) - 2
        basis = svdlib.basis_conv_weight(layer.svd, keep, layer.weight_shape[1:])
        scaling = scaling.reshape(layer.out_channels, rank, *([1] * spatial))
    else:
        basis = np.take_along_axis(layer.svd.vt, keep[:, :, None], axis=1)[0]  # (r, K)
        scaling = scaling[0]  # (N, r)
        if layer.op == "MatMul":
            basis, scaling = basis.T, scaling.T  # x @ V, then @ (U S)^T
    return basis.astype(dtype), scaling.astype(dtype)


def split_node(graph: ir.Graph, node: ir.Node, layer: Layer, keep: np.ndarray) -> None:
    """Replace ``node`` by its basis/scaling pair keeping the bases ``keep``."""
    dtype = node.inputs[1].const_value.numpy().dtype
    rank = keep.shape[1]
    scaling_m, bias_change = scaling_and_bias_change(layer, node, keep)
    basis_w, scaling_w = _pair_weights(layer, keep, scaling_m, dtype)
    name = node.name
    basis_w_value = new_initializer(graph, f"{name}.basis.weight", basis_w)
    scaling_w_value = new_initializer(graph, f"{name}.scaling.weight", scaling_w)
    x = node.inputs[0]
    if layer.op == "Conv":
        spatial = len(layer.weight_shape) - 2
        basis_attrs = _copy_attrs(node)
        scaling_attrs = [ir.AttrInt64("group", layer.groups), ir.AttrInt64s("kernel_shape", [1] * spatial)]
        rest = list(node.inputs[2:3])
    elif layer.op == "Gemm":
        basis_attrs = [ir.AttrInt64("transB", 1)]
        beta = node.attributes.get_float("beta", 1.0)
        scaling_attrs = [ir.AttrInt64("transB", 1), ir.AttrFloat32("beta", beta)]
        rest = list(node.inputs[2:3])
    else:
        basis_attrs, scaling_attrs, rest = [], [], []
    basis = ir.Node(
        "", layer.op, [x, basis_w_value], attributes=basis_attrs, name=f"{name}.basis",
        metadata_props=_metadata(layer, "basis", rank),
    )
    basis.outputs[0].name = _unique_value_name(graph, f"{node.outputs[0].name}.basis")
    scaling = ir.Node(
        "", layer.op, [basis.outputs[0], scaling_w_value, *rest], attributes=scaling_attrs,
        name=f"{name}.scaling", metadata_props=_metadata(layer, "scaling", rank),
    )
    if bias_change is not None:
        add_to_bias(graph, scaling, bias_change, dtype)
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [basis, scaling], list(node.outputs), list(scaling.outputs)
    )


def recompose_node(graph: ir.Graph, node: ir.Node, layer: Layer, keep: np.ndarray) -> None:
    """Swap ``node``'s weight for the truncated ``U_r S_r V_r^T`` (same op, same attributes)."""
    dtype = node.inputs[1].const_value.numpy().dtype
    scaling, bias_change = scaling_and_bias_change(layer, node, keep)
    w = scaling @ np.take_along_axis(layer.svd.vt, keep[:, :, None], axis=1)  # (g, out_g, fan_in), y = W x
    if layer.op == "Conv":
        weight = w.reshape(layer.weight_shape)
    elif layer.op == "MatMul":
        weight = w[0].T
    else:
        weight = w[0] if node.attributes.get_int("transB", 0) else w[0].T
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)  # alpha is folded into w
    new_value = new_initializer(graph, f"{node.name}.weight_rank{keep.shape[1]}", weight.astype(dtype))
    node.replace_input_with(1, new_value)
    if bias_change is not None:
        add_to_bias(graph, node, bias_change, dtype)


class ApplyDecisionsPass(ir.passes.InPlacePass):
    """Apply one :class:`Decision` per layer name; layers without one stay as they are."""

    def __init__(self, layers: dict[str, Layer], decisions: dict[str, Decision]):
        super().__init__()
        self.layers = layers
        self.decisions = decisions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            decision = self.decisions.get(node.name)
            if decision is None or decision.action in ("kept", "skipped"):
                continue
            layer = self.layers[node.name]
            if decision.action == "decomposed":
                split_node(graph, node, layer, decision.keep)
            else:
                recompose_node(graph, node, layer, decision.keep)
            modified = True
        if modified:
            common.RemoveUnusedNodesPass()(model)
            common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified)
