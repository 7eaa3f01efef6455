"""Re-derive the cost model's constants from per-layer timings, per rank block.

    .venv/bin/python benchmarks/cost_model.py [MODEL.onnx ...] [--blocks 8,16] [--batches 1,8]

The cost model (``onnx_basisprune/basis/layers.py``) says a basis/scaling pair at rank r pays
when ``split MACs + NODE_OVERHEAD_MACS + INTERMEDIATE_MACS_PER_ELEMENT x intermediate elements``
is below the layer's MACs. This script times every splittable layer of each model, as the
original node and as the pair at each rank aligned to the block (the tool's own per-layer timing,
``runtime/latency.py``, cached), and fits, per block and batch size, the pair's extra time over
the original node's by non-negative least squares:

    t_pair(r) - t_node = a x (split MACs - MACs) + b + c x intermediate elements

so that ``b / a`` is the node overhead and ``c / a`` the traffic per element, both in MACs as the
cost model counts them. It then counts, per block and batch, how many layers the cost model (with
today's constants and with the fitted ones) puts on the same side as the measurement: whether the
pair at the smallest timed rank is faster than the node (whether the layer can pay at all).
Writes benchmarks/results/cost_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = ROOT / "build" / "benchmarks" / "models"
DEFAULT_MODELS = (SHARED / "models" / "resnet56_cifar10.onnx", SHARED / "models" / "resnet20_cifar10.onnx",
                  MODELS / "mobilenet_v2_hymenoptera.onnx", MODELS / "mobilenet_v2_cifar10.onnx")


@dataclass(frozen=True)
class Point:
    """One timed pair against its node."""

    model: str
    layer: str
    rank: int
    extra_ms: float  # pair minus node
    node_ms: float
    delta_macs: float  # split MACs minus the layer's MACs, at this batch size
    intermediate: float  # elements of the basis tensor, at this batch size


def _relative(path: Path) -> str:
    """``path`` relative to the repository (``../shared/...`` for the shared assets)."""
    return os.path.relpath(path, ROOT)


def points(models: Sequence[Path], block: int, batch: int) -> tuple[list[Point], dict[str, dict]]:
    """Every timed (layer, rank) of ``models`` at ``block`` and ``batch``; and per layer what the
    decision comparison needs."""
    from onnx_basisprune.api import prepare
    from onnx_basisprune.runtime.latency import measure_latency_table

    out, layers = [], {}
    for path in models:
        prepared = prepare(path)
        table = measure_latency_table(prepared, "cpu", batch=batch, block=block)
        for name, timing in table.layers.items():
            layer = prepared.layers[name]
            layers[f"{path.name}:{name}"] = {"layer": layer, "timing": timing}
            for rank, ms in timing.pair_ms.items():
                out.append(Point(path.name, name, rank, ms - timing.original_ms, timing.original_ms,
                                 batch * (layer.split_macs(rank) - layer.macs), batch * layer.groups * rank * layer.positions))
    return out, layers


def fit(pts: Sequence[Point]) -> dict[str, float]:
    """Non-negative least squares of the extra time on (MACs change, 1, intermediate elements),
    each row weighted by 1 / the node's time (relative errors: small layers count as much)."""
    w = 1.0 / np.array([max(p.node_ms, 1e-6) for p in pts])
    design = np.array([[p.delta_macs, 1.0, p.intermediate] for p in pts]) * w[:, None]
    target = np.array([p.extra_ms for p in pts]) * w
    (a, b, c), _ = nnls(design, target)  # time per MAC, per extra node, per element: none negative
    slope = a if a > 0 else float("nan")
    return {"ms_per_mac": float(a), "node_ms": float(b), "ms_per_element": float(c),
            "node_overhead_macs": float(b / slope), "intermediate_macs_per_element": float(c / slope)}


def decisions_agree(layers: dict[str, dict], batch: int, overhead: float, traffic: float) -> tuple[int, int]:
    """Layers where the cost model with these constants and the measurement agree on whether the
    pair at the smallest timed rank is faster than the node, out of all timed layers."""
    agree = 0
    for entry in layers.values():
        layer, timing = entry["layer"], entry["timing"]
        rank = min(timing.pair_ms)
        measured = timing.pair_ms[rank] < timing.original_ms
        predicted = (layer.split_macs(rank) * batch + overhead + traffic * layer.groups * rank * layer.positions * batch
                     < layer.macs * batch)
        agree += int(measured == predicted)
    return agree, len(layers)


def main(argv: Sequence[str] | None = None) -> int:
    from onnx_basisprune.basis.layers import INTERMEDIATE_MACS_PER_ELEMENT, NODE_OVERHEAD_MACS
    from onnx_basisprune.runtime.machine import cpu_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, help="ONNX models (default: the benchmark models that exist)")
    parser.add_argument("--blocks", default="8,16", help="rank blocks to fit (default 8,16)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cost_model.json")
    args = parser.parse_args(argv)
    models = [p for p in (args.models or DEFAULT_MODELS) if p.exists()]
    if not models:
        parser.error("none of the models exists")
    rows = []
    for block in (int(b) for b in args.blocks.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            pts, layers = points(models, block, batch)
            fitted = fit(pts)
            today = decisions_agree(layers, batch, NODE_OVERHEAD_MACS, INTERMEDIATE_MACS_PER_ELEMENT)
            refit = decisions_agree(layers, batch, fitted["node_overhead_macs"], fitted["intermediate_macs_per_element"])
            rows.append({"block": block, "batch": batch, "points": len(pts), "layers": len(layers), **fitted,
                         "agree_today": today[0], "agree_fitted": refit[0]})
            print(f"block {block} batch {batch}: {len(pts)} pairs on {len(layers)} layers; node overhead "
                  f"{fitted['node_overhead_macs']:.3g} MACs, traffic {fitted['intermediate_macs_per_element']:.3g} MACs/element; "
                  f"decisions agreeing with the timing: today's constants {today[0]}/{today[1]}, fitted {refit[0]}/{refit[1]}",
                  flush=True)
    record = {"date": date.today().isoformat(), "cpu": cpu_model(), "models": [_relative(p) for p in models],
              "today": {"node_overhead_macs": NODE_OVERHEAD_MACS, "intermediate_macs_per_element": INTERMEDIATE_MACS_PER_ELEMENT},
              "rows": rows, "command": ".venv/bin/python benchmarks/cost_model.py"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
