"""Channel pruning's refit in graph order: after a channel removal, every layer whose input
changes is refitted on the inputs the channel-pruned model really produces, to reproduce the
*original* model's output (the asymmetric reconstruction of Zhang et al. 2015 and He et al. 2017,
in the layer order of the basis stage's sequential fit).

The walk runs the original model twice over the fitting images
(:func:`onnx_basisprune.calibration.reconstruction.sequential_fit`): as it is, and with the removed
channels gated to 0 at the analysis' gate sites, which computes what the model with those channels
taken out computes. A layer that lost input channels is refitted on its kept inputs, a layer
further down on all of them; each refit is in use before the walk goes on, so later layers
correct what earlier ones could not. The refits are then installed in the channel-removed model
(:func:`onnx_basisprune.channels.refit.apply_refits`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..basis.data_aware import LayerTarget, layer_targets
from ..basis.layers import Layer
from ..basis.reconstruct import InputMoments
from ..basis.svd import refit_columns
from ..channels.analysis import ChannelAnalysis
from ..channels.refit import Refit, has_bias, kept_channels, kept_columns


def channel_gates(analysis: ChannelAnalysis, removed: np.ndarray) -> dict[str, tuple[int, np.ndarray]]:
    """Gate site tensor -> (channel axis, 0 for each removed channel and 1 for the others), for
    the sites that lose a channel."""
    gates = {}
    for site in analysis.sites:
        mask = np.where(site.groups >= 0, ~removed[np.maximum(site.groups, 0)], True)
        if not mask.all():
            gates[site.tensor] = (site.axis, mask.astype(np.float32))
    return gates


@dataclass(frozen=True)
class SequentialRefit:
    """Refits, for a channel removal, every layer (2-D Conv with ``group == 1``, Gemm, MatMul of
    ``targets``) whose input changes, in graph order over ``batches()`` with ``module`` (the
    Torch module of the analysed model)."""

    targets: Mapping[str, LayerTarget]
    analysis: ChannelAnalysis
    module: object  # calibration.interpreter.OnnxTorchModule
    batches: Callable[[], Iterable]
    device: str | None = None
    seed: int = 0
    progress: bool = False
    rows_per_input: int = 16  # sampled input rows per input dimension (see sequential_fit)

    @classmethod
    def of(cls, model: ir.Model, layers: Mapping[str, Layer], shapes, analysis: ChannelAnalysis, module, batches,
           **options) -> SequentialRefit:
        targets = {name: t for name, t in layer_targets(model, layers, shapes).items() if t.weight.shape[0] == 1}
        return cls(targets, analysis, module, batches, **options)

    def __call__(self, removed: np.ndarray) -> dict[str, Refit]:
        from ..calibration.reconstruction import sequential_fit

        keeps = kept_channels(self.analysis, removed)
        sites = {name: t.site() for name, t in self.targets.items()}
        refits: dict[str, Refit] = {}

        def fit(name: str, moments: InputMoments) -> tuple[np.ndarray, np.ndarray | None]:
            t = self.targets[name]
            weight = t.weight[0]
            columns = kept_columns(keeps[name][1], weight.shape[1]) if name in keeps else np.arange(weight.shape[1])
            with_bias = has_bias(t.node)
            branch = moments.branch_cross is not None
            fitted, delta = refit_columns(weight, columns, moments.gram[0], moments.mean_p[0], with_bias,
                                          cross=moments.cross[0], mean_o=moments.mean_o[0],
                                          branch_cross=moments.branch_cross[0] if branch else None,
                                          branch_mean=moments.branch_mean[0] if branch else None)
            refits[name] = Refit(fitted, delta)
            full = np.zeros_like(weight)
            full[:, columns] = fitted
            return t.as_node_inputs(full[None], t.bias + delta if with_bias else None)

        sequential_fit(self.module, sites, fit, self.batches(), gates=channel_gates(self.analysis, removed),
                       device=self.device, seed=self.seed, progress=self.progress, rows_per_input=self.rows_per_input)
        return refits
