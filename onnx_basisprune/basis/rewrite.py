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
from .layers import Layer, fc_layout
from .reconstruct import Factors

META_ROLE = "basisprune.role"
META_LAYER = "basisprune.layer"
META_FULL_RANK = "basisprune.full_rank"
META_KEPT_RANK = "basisprune.kept_rank"
META_SINGULAR_VALUES = "basisprune.singular_values"


@dataclass
class Decision:
    """What happens to one layer; ``keep`` holds the kept basis indices per group (groups, r).

    ``factors``, when set, are the data-aware basis/scaling pair fitted on calibration data (see
    :mod:`.reconstruct`): a ``decomposed`` layer becomes exactly that pair, any other action
    takes their recomposed weight and bias (a refit at the layer's own rank)."""

    action: str  # "decomposed", "recomposed", "kept" or "skipped"
    reason: str
    keep: np.ndarray | None = None
    factors: Factors | None = None

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
    beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
    set_bias(graph, node, delta if old is None else beta * old.astype(np.float64) + delta, dtype)


def set_bias(graph: ir.Graph, node: ir.Node, bias: np.ndarray, dtype: np.dtype) -> None:
    """Make ``bias`` the node's bias input (Conv B, Gemm C with beta 1), creating it when absent."""
    if node.op_type == "Gemm":
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    value = new_initializer(graph, f"{node.name}.bias", np.asarray(bias).astype(dtype))
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)


def _pair_weights(layer: Layer, rows: np.ndarray, scaling: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(basis weight, scaling weight) in the node layout of ``layer.op``, from the basis filters
    ``rows`` (groups, r, fan_in) and the scaling matrix (groups, out_g, r)."""
    rank = rows.shape[1]
    if layer.op == "Conv":
        spatial = len(layer.weight_shape) - 2
        basis = rows.reshape(-1, *layer.weight_shape[1:])
        scaling = scaling.reshape(layer.out_channels, rank, *([1] * spatial))
    else:
        basis = rows[0]  # (r, K)
        scaling = scaling[0]  # (N, r)
        if layer.op == "MatMul":
            basis, scaling = basis.T, scaling.T  # x @ V, then @ (U S)^T
    return basis.astype(dtype), scaling.astype(dtype)


def _pair(layer: Layer, node: ir.Node, decision: Decision) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(basis filters, scaling matrix, new bias or None, bias change or None) of a split."""
    if decision.factors is not None:
        return decision.factors.basis, decision.factors.scaling, decision.factors.bias, None
    rows = svdlib.kept_rows(layer.svd, decision.keep)
    scaling, bias_change = scaling_and_bias_change(layer, node, decision.keep)
    return rows, scaling, None, bias_change


GEMM_C_OPTIONAL_SINCE = 11  # Gemm's C input is required before this default-domain opset
GEMM_BROADCASTS_SINCE = 7  # before it, Gemm broadcasts C only with broadcast=1


def _default_opset(graph: ir.Graph) -> int:
    return graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", GEMM_C_OPTIONAL_SINCE))


def _gemm_c(graph: ir.Graph, c: ir.Value | None, name: str, size: int, dtype: np.dtype) -> list[ir.Value]:
    """A new Gemm's C input: ``c``, or zeros of ``size`` where the opset requires C (before 11)."""
    if c is None and _default_opset(graph) < GEMM_C_OPTIONAL_SINCE:
        c = new_initializer(graph, name, np.zeros(size, dtype))
    return [] if c is None else [c]


def legacy_gemm_attrs(graph: ir.Graph) -> list[ir.Attr]:
    """``broadcast=1`` before opset 7, so a new Gemm's 1-D C broadcasts over the rows."""
    return [ir.AttrInt64("broadcast", 1)] if _default_opset(graph) < GEMM_BROADCASTS_SINCE else []


def split_node(graph: ir.Graph, node: ir.Node, layer: Layer, decision: Decision) -> None:
    """Replace ``node`` by its basis/scaling pair: the kept bases of the weight's SVD, or the
    decision's data-aware factors."""
    dtype = node.inputs[1].const_value.numpy().dtype
    rows, scaling_m, new_bias, bias_change = _pair(layer, node, decision)
    rank = rows.shape[1]
    basis_w, scaling_w = _pair_weights(layer, rows, scaling_m, dtype)
    name = node.name
    basis_w_value = new_initializer(graph, f"{name}.basis.weight", basis_w)
    scaling_w_value = new_initializer(graph, f"{name}.scaling.weight", scaling_w)
    x = node.inputs[0]
    basis_rest: list[ir.Value] = []
    if layer.op == "Conv":
        spatial = len(layer.weight_shape) - 2
        basis_attrs = _copy_attrs(node)
        scaling_attrs = [ir.AttrInt64("group", layer.groups), ir.AttrInt64s("kernel_shape", [1] * spatial)]
        rest = list(node.inputs[2:3])
    elif layer.op == "Gemm":
        legacy = legacy_gemm_attrs(graph)
        basis_attrs = [ir.AttrInt64("transB", 1), *legacy]
        beta = node.attributes.get_float("beta", 1.0)
        scaling_attrs = [ir.AttrInt64("transB", 1), ir.AttrFloat32("beta", beta), *legacy]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        basis_rest = _gemm_c(graph, None, f"{name}.basis.bias", rank, dtype)
        rest = _gemm_c(graph, c, f"{name}.scaling.bias", layer.out_channels, dtype)
    else:
        basis_attrs, scaling_attrs, rest = [], [], []
    basis = ir.Node(
        "", layer.op, [x, basis_w_value, *basis_rest], attributes=basis_attrs, name=f"{name}.basis",
        metadata_props=_metadata(layer, "basis", rank),
    )
    basis.outputs[0].name = _unique_value_name(graph, f"{node.outputs[0].name}.basis")
    scaling = ir.Node(
        "", layer.op, [basis.outputs[0], scaling_w_value, *rest], attributes=scaling_attrs,
        name=f"{name}.scaling", metadata_props=_metadata(layer, "scaling", rank),
    )
    if bias_change is not None:
        add_to_bias(graph, scaling, bias_change, dtype)
    if new_bias is not None:
        set_bias(graph, scaling, new_bias, dtype)
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [basis, scaling], list(node.outputs), list(scaling.outputs)
    )


def node_weight_layout(layer: Layer, node: ir.Node, w: np.ndarray) -> np.ndarray:
    """Per-group matrices (g, out_g, fan_in) with ``y = W x`` as the node's weight input, for the
    node with ``alpha`` set to 1 (Gemm)."""
    if layer.op == "Conv":
        return w.reshape(layer.weight_shape)
    return fc_layout(node, w[0])


def recompose_node(graph: ir.Graph, node: ir.Node, layer: Layer, decision: Decision) -> None:
    """Swap ``node``'s weight for the truncated ``U_r S_r V_r^T``, or the recomposed data-aware
    factors (same op, same attributes)."""
    dtype = node.inputs[1].const_value.numpy().dtype
    if decision.factors is not None:
        w, new_bias, bias_change = decision.factors.weight(), decision.factors.bias, None
    else:
        scaling, bias_change = scaling_and_bias_change(layer, node, decision.keep)
        w, new_bias = scaling @ svdlib.kept_rows(layer.svd, decision.keep), None
    if layer.op == "Gemm":
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)  # alpha is folded into w
    rank = decision.keep.shape[1] if decision.factors is None else decision.factors.rank
    new_value = new_initializer(graph, f"{node.name}.weight_rank{rank}", node_weight_layout(layer, node, w).astype(dtype))
    node.replace_input_with(1, new_value)
    if bias_change is not None:
        add_to_bias(graph, node, bias_change, dtype)
    if new_bias is not None:
        set_bias(graph, node, new_bias, dtype)


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
            if decision is None or (decision.action in ("kept", "skipped") and decision.factors is None):
                continue
            layer = self.layers[node.name]
            if decision.action == "decomposed":
                split_node(graph, node, layer, decision)
            else:
                recompose_node(graph, node, layer, decision)
            modified = True
        if modified:
            common.RemoveUnusedNodesPass()(model)
            common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified)
