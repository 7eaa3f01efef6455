"""The final speed check: a pruned model is handed over as faster only when it measured faster.

After pruning, the original and the pruned model are timed alternately with onnxruntime on the
target provider at each batch size (:mod:`.bench`). "Faster" means the 95 % interval of the
latency ratio lies below 1 at every batch size. When it does not, and the target allows it
(``--max-drop`` and latency targets, not a params or MACs budget, which recomposing would break),
the split layers that save the least (by the per-layer timings, else the cost model) are
recomposed, a quarter of them at a time: a recomposed layer computes the same function with the
original's node, so quality is unchanged. Whatever happens is returned as a :class:`SpeedCheck`
the console and the report state plainly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import onnx_ir as ir

from ..basis.rewrite import Decision
from .bench import BenchResult

ROUNDS = 30
WARMUP = 5


@dataclass(frozen=True)
class SpeedCheck:
    provider: str
    latency: list[dict]  # per batch size: original_ms, pruned_ms, ratio, ratio_ci (the final model)
    faster: bool
    recomposed: tuple[str, ...]  # layers recomposed because the split model was not faster (kept: it helped)
    retimed: int  # timings after the first
    environment: dict[str, str]  # where it was timed (bench's record: CPU, threads, versions, date)
    tried: int = 0  # layers recomposed on trial when that did not make the model faster (then undone)

    def to_json(self) -> dict:
        return {"provider": self.provider, "faster": self.faster, "recomposed": list(self.recomposed),
                "retimed": self.retimed, "tried_and_undone": self.tried, "latency": self.latency}

    def describe(self) -> str:
        ratios = ", ".join(f"batch {row['batch']} {row['ratio']:.3f}" for row in self.latency)
        verdict = "faster" if self.faster else "NOT faster than the original (the ratio's 95% interval reaches 1)"
        done = (f"; {len(self.recomposed)} split layers that saved least were recomposed to get there" if self.recomposed
                else f"; recomposing all {self.tried} split layers did not make it faster either, so none was"
                if self.tried else "")
        return f"speed check on {self.provider}: latency ratio {ratios}: {verdict}{done}"


def time_against(original: ir.Model, pruned: ir.Model, provider: str, batches: Sequence[int],
                 input_shapes: Mapping[str, Sequence[int]] | None) -> tuple[list[dict], dict[str, str]]:
    """Original and pruned timed alternately at each batch size: rows with the median times,
    the ratio and its 95 % interval; and the environment."""
    from .bench import BenchConfig, benchmark

    config = BenchConfig(providers=(provider,), batches=tuple(batches), warmup=WARMUP, rounds=ROUNDS,
                         input_shapes=input_shapes)
    result = benchmark([ir.to_proto(original), ir.to_proto(pruned)], config, names=["original", "pruned"])
    return latency_rows(result)[provider], result.environment


def latency_rows(result: BenchResult) -> dict[str, list[dict]]:
    """A two-model benchmark (original, pruned) as the report's rows: per provider and batch size
    the median times, the ratio and its 95 % interval."""
    rows: dict[str, list[dict]] = {}
    for case in result.cases:
        before, after = case.timings
        rows.setdefault(case.provider, []).append(
            {"batch": case.batch, "threads": case.threads, "original_ms": before.median_ms, "pruned_ms": after.median_ms,
             "ratio": after.ratio, "ratio_ci": list(after.ratio_ci) if after.ratio_ci else None})
    return rows


def measured_faster(rows: Sequence[dict]) -> bool:
    """The ratio's 95 % interval (its median where there is none) below 1 at every batch size."""
    return all((row["ratio_ci"][1] if row["ratio_ci"] else row["ratio"]) < 1.0 for row in rows)


def check_speed(original: ir.Model, decisions: Mapping[str, Decision], build: Callable[[Mapping[str, Decision]], ir.Model],
                savings: Mapping[str, float], provider: str, batches: Sequence[int],
                input_shapes: Mapping[str, Sequence[int]] | None, may_recompose: bool,
                progress: bool = True, model: ir.Model | None = None) -> tuple[dict[str, Decision], ir.Model, SpeedCheck]:
    """Time the model ``decisions`` build (``model``, when it is already built) against
    ``original``; while it is not faster (and ``may_recompose``), recompose the split layers with
    the smallest ``savings`` (a quarter of those left each time) and time again. Returns the final
    decisions, their model and the check."""
    first = dict(decisions)
    decisions, model = dict(first), build(first) if model is None else model
    rows, environment = time_against(original, model, provider, batches, input_shapes)
    start = (model, rows)
    split = sorted((name for name, d in decisions.items() if d.action == "decomposed"), key=lambda n: savings.get(n, 0.0))
    recomposed: list[str] = []
    retimed = 0
    while may_recompose and split and not measured_faster(rows):
        chunk, split = split[: max(1, len(split) // 4)], split[max(1, len(split) // 4):]
        for name in chunk:
            decisions[name] = replace(decisions[name], action="recomposed",
                                      reason="split was not faster in the final speed check")
        recomposed += chunk
        if progress:
            ratios = ", ".join(f"{row['ratio']:.3f}" for row in rows)
            print(f"speed check: not faster (ratio {ratios}); recomposing {len(chunk)} split layers that save least")
        model = build(decisions)
        rows, environment = time_against(original, model, provider, batches, input_shapes)
        retimed += 1
    if recomposed and not measured_faster(rows):  # it did not help: keep the pruned model
        (model, rows), decisions, tried, recomposed = start, first, len(recomposed), []
    else:
        tried = 0
    return decisions, model, SpeedCheck(provider, rows, measured_faster(rows), tuple(recomposed), retimed, environment,
                                        tried)
