"""Normalising passes run before any split, each an onnx_ir pass with one job.

Real exports carry weights in many forms; after normalisation every constant is an initializer
(not a graph input), Identity/ConstantOfShape chains over constants are folded, BatchNormalization
is folded into the preceding Conv/Gemm, every node has a unique name, and nodes are sorted.
The common work is done by the passes onnx_ir and onnxscript already provide.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript import rewriter
from onnxscript.optimizer._constant_folding import FoldConstantsPass
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_gemm_rule,
)

# Fold constant subgraphs whatever their size: weights routed through Identity, Cast,
# Transpose or ConstantOfShape must become plain initializers before they are split.
_FOLD_LIMIT = 1 << 62


def _fold_constant_of_shape(node: ir.Node) -> bool | None:
    """Fold a ConstantOfShape (onnxscript keeps it by default, to keep models small) when its
    output is only constant data: an input of nodes whose other inputs are constants (a weight
    built as zeros + W) or the weight/bias of a Conv/Gemm/MatMul. Elsewhere the default applies."""
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    uses = node.outputs[0].uses()

    def constant_use(user: ir.Node, index: int) -> bool:
        if index >= 1 and user.op_type in ("Conv", "Gemm", "MatMul"):
            return True
        return all(v is None or v is node.outputs[0] or v.const_value is not None for v in user.inputs)

    return True if uses and all(constant_use(user, index) for user, index in uses) else None


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold BatchNormalization into the preceding Conv/Gemm (onnxscript's rules), keeping the
    Conv/Gemm node's name so reports and metadata still point at the layer the user knows."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = {}
        for node in model.graph:
            producer = node.inputs[0].producer() if node.op_type == "BatchNormalization" and node.inputs else None
            if producer is not None and producer.op_type in ("Conv", "Gemm") and producer.name:
                names[node.outputs[0].name] = producer.name
        rules = rewriter.RewriteRuleSet([fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule])
        result = rewriter.RewritePass(rules)(model)
        for node in model.graph:
            if node.outputs and node.outputs[0].name in names and node.op_type != "BatchNormalization":
                node.name = names[node.outputs[0].name]
        return ir.passes.PassResult(model, result.modified)


class InitializersNotInputsPass(ir.passes.InPlacePass):
    """Drop initializers from the graph inputs (old exports list them there). IR versions
    before 4 require that listing, so such a model moves to IR version 4, which allows it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = common.RemoveInitializersFromInputsPass()(model)
        if result.modified and model.ir_version < 4:
            model.ir_version = 4
        return ir.passes.PassResult(model, result.modified)


def normalising_passes() -> ir.passes.Sequential:
    """The pass pipeline; exposed so tests can run it alone."""
    return ir.passes.Sequential(
        InitializersNotInputsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        FoldConstantsPass(
            shape_inference=False,
            input_size_limit=_FOLD_LIMIT,
            output_size_limit=_FOLD_LIMIT,
            should_fold=_fold_constant_of_shape,
        ),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        FoldBatchNormPass(),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
        common.TopologicalSortPass(),
    )


def normalize(model: ir.Model) -> ir.Model:
    """Normalise ``model`` in place and return it."""
    normalising_passes()(model)
    return model
