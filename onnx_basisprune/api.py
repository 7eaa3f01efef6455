"""The Python API the CLI is a thin layer over: ``prune``, ``inspect`` and ``decompose``.

    >>> from onnx_basisprune import prune
    >>> result = prune("model.onnx", calib="data/", target_macs=0.7)   # the main job
    >>> result.save("model.pruned.onnx"); print(result.quality.drop, result.pruned.macs / result.original.macs)
    >>> prune("model.onnx", energy=0.99)                                # data-free
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .basis.svd import energy_rank
from .config import DataSource, PruneConfig
from .pipeline.job import run_main_job
from .pipeline.prepared import ModelLike, Prepared, PruneResult, apply_plan, as_ir, prepare
from .plan import ranks
from .plan.plans import data_free_plan, predicted_latency_ratio, use_measured_latency


def decompose(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> PruneResult:
    """Split every splittable layer at full rank: the result computes the same function (checked
    against the user's model when saved)."""
    prepared = prepare(model, input_shapes)
    result = apply_plan(prepared, ranks.full_rank_plan(prepared.layers), in_place=True, fuse=False)
    result.reference = as_ir(model)
    return result


def prune(
    model: ModelLike,
    calib: DataSource | None = None,
    *,
    eval: DataSource | None = None,  # noqa: A002 - the CLI's --eval
    labels: str | os.PathLike | None = None,
    max_drop: float | None = None,
    target_params: float | None = None,
    target_macs: float | None = None,
    target_latency: float | None = None,
    energy: float | None = None,
    double: bool = False,
    criterion: str | None = None,
    provider: str = "cpu",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    progress: bool = True,
    **options,
) -> PruneResult:
    """Prune ``model`` (a path, an ``onnx.ModelProto`` or an ``ir.Model``; never modified).

    With ``calib`` (an image folder, an .npy/.npz file or arrays) the main job: the strongest basis
    pruning whose held-out quality drop stays within ``max_drop`` points (default 1, a 95 % bound
    on a held-out part of ``calib``, or on ``eval``), or the least pruning that meets
    ``target_params`` / ``target_macs`` / ``target_latency`` (the fraction that remains), with
    ranks allocated by ``criterion`` (default ``"fisher"``) and every layer refitted in graph
    order on the calibration data; ``double`` removes whole channels first. ``labels`` maps
    class folder names to output indices.

    Without ``calib``, data-free: per layer the bases covering ``energy`` (default 0.99) of the
    squared singular values, or a params/MACs/latency budget by singular values.

    ``options`` are the other fields of :class:`~onnx_basisprune.config.PruneConfig` (``holdout``,
    ``limit``, ``fit``, ``tune``, ``unlabeled``, ``latency_aware``, ``latency_batches``,
    ``full_rank``, ``preprocessing``, ``batch_size``, ``device``, ...).
    """
    config = PruneConfig(calib=calib, eval=eval, labels=labels, max_drop=max_drop, target_params=target_params,
                         target_macs=target_macs, target_latency=target_latency, energy=energy, double=double,
                         criterion=criterion, provider=provider, input_shapes=input_shapes, seed=seed, progress=progress,
                         **options)
    return run(model, config)


def run(model: ModelLike, config: PruneConfig) -> PruneResult:
    """One pruning run as ``config`` says (what :func:`prune` and the CLI call)."""
    if config.calib is not None:
        return run_main_job(model, config)
    if config.full_rank:
        return decompose(model, config.input_shapes)
    prepared = prepare(model, config.input_shapes)
    table = None
    if config.latency_aware or config.target_latency is not None:
        prepared, table = use_measured_latency(prepared, config.provider, ranks.block_size(config.provider),
                                               config.latency_batches)
    plan = data_free_plan(prepared, energy=config.energy, target_params=config.target_params,
                          target_macs=config.target_macs, provider=config.provider,
                          target_latency=config.target_latency, table=table)
    result = apply_plan(prepared, plan, in_place=True)
    if table is not None:
        result.predicted_latency_ratio = predicted_latency_ratio(prepared, plan, table)
    return result


@dataclass
class InspectRow:
    name: str
    op: str
    weight_shape: list[int]
    full_rank: int
    break_even_rank: int
    rank_90: int | None
    rank_99: int | None
    rank_999: int | None
    params: int
    macs: int | None  # None: output size unknown
    note: str


def inspect(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[Prepared, list[InspectRow]]:
    """Per layer: op, weight shape, full and break-even rank, ranks at 90/99/99.9% energy, cost."""
    prepared = prepare(model, input_shapes)
    rows = []
    for layer in prepared.layers.values():
        at = (lambda e: energy_rank(layer.svd.s, e)) if layer.svd is not None else (lambda e: None)
        rows.append(
            InspectRow(
                name=layer.name,
                op=layer.op,
                weight_shape=list(layer.weight_shape),
                full_rank=layer.full_rank,
                break_even_rank=layer.break_even_rank,
                rank_90=at(0.90),
                rank_99=at(0.99),
                rank_999=at(0.999),
                params=layer.params,
                macs=layer.macs if layer.positions_known else None,
                note=layer.skip_reason or "",
            )
        )
    return prepared, rows
