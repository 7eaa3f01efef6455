"""The main job: basis (or double) pruning of a model on the user's calibration data.

prepare (:mod:`.prepared`) -> load the data and set up the held-out evaluator
(:mod:`.calibrated`) -> basis pruning to the target (:func:`.calibrated.basis_stage`) or, with
``double``, channels first (:mod:`.double`).
"""

from __future__ import annotations

from dataclasses import replace

from ..config import PruneConfig
from ..io.shapes import unsized_inputs
from ..runtime.speed_check import SpeedCheck, measured_faster, time_against
from .calibrated import basis_stage, load_calibration_data
from .double import double_prune
from .prepared import ModelLike, PruneResult, prepare


def run_main_job(model: ModelLike, config: PruneConfig) -> PruneResult:
    """The calibrated job: prepare, load the data, then basis (or double) pruning to the target."""
    prepared = prepare(model, config.input_shapes)
    data = load_calibration_data(prepared, config)
    if unsized_inputs(prepared.model, prepared.input_shapes):  # symbolic input size: the data's
        sample, _ = next(data.calib.batches(1))
        prepared = prepared.with_input_shapes({name: x.shape for name, x in sample.items()})
    if not config.double:
        return basis_stage(prepared, data, config.target(), prepared.original, verbose=config.progress)
    result = double_prune(prepared, data, config.target())
    if config.check_speed and not unsized_inputs(prepared.model, prepared.input_shapes):  # reported, not acted on
        rows, environment = time_against(prepared.model, result.model, config.provider, config.latency_batches,
                                         prepared.input_shapes)
        check = SpeedCheck(config.provider, rows, measured_faster(rows), (), 0, environment)
        if config.progress:
            print(check.describe())
        result = replace(result, speed_check=check)
    return result
