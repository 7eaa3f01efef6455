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


def normalising_passes() -> ir.passes.Sequential:
    """The pass pipeline; exposed so tests can run it alone."""
    return ir.passes.Sequential(
        common.RemoveInitializersFromInputsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        FoldConstantsPass(shape_inference=False, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        rewriter.RewritePass(
            rewriter.RewriteRuleSet([fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule])
        ),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
        common.TopologicalSortPass(),
    )


def normalize(model: ir.Model) -> ir.Model:
    """Normalise ``model`` in place and return it."""
    normalising_passes()(model)
    return model
