"""Plain-text tables for the console and the JSON report written by the CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..api import InspectRow
from ..pipeline.prepared import LayerReport, PruneResult
from ..plan.search import describe_change


def human(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.3g}P"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned first column, right-aligned others."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def file_size(path: str | os.PathLike) -> int:
    """Size of a model file plus its external data files next to it."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def summary_table(result: PruneResult, size_before: int | None = None, size_after: int | None = None) -> str:
    rows = [
        ("params", human(result.original.params), human(result.pruned.params), _ratio(result.pruned.params, result.original.params)),
        ("MACs (batch 1)", human(result.original.macs), human(result.pruned.macs), _ratio(result.pruned.macs, result.original.macs)),
    ]
    if size_before is not None and size_after is not None:
        rows.append(("file size", human_bytes(size_before), human_bytes(size_after), _ratio(size_after, size_before)))
    q = result.quality
    if q is not None:
        rows.append((f"{q.metric} (n={q.n})", f"{q.original:.4f}", f"{q.pruned:.4f}", describe_change(q.drop, q.drop_bound)))
    return table(("", "original", "pruned", "ratio"), rows)


def _ratio(after: float | None, before: float | None) -> str:
    return f"{after / before:.3f}" if before else "-"


def _exact(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def layer_table(layers: Sequence[LayerReport]) -> str:
    rows = [
        (
            layer.name,
            layer.op,
            "x".join(map(str, layer.weight_shape)),
            layer.full_rank,
            layer.break_even_rank,
            "-" if layer.kept_rank is None else layer.kept_rank,
            layer.action,
            human(layer.params),
            human(layer.pruned_params),
            layer.reason,
        )
        for layer in layers
    ]
    return table(("layer", "op", "weight", "rank", "break-even", "kept", "action", "params", "->", "reason"), rows)


def channel_table(rows: Sequence[dict]) -> str:
    """Channels of each Conv/Gemm/MatMul before and after the channel stage of double pruning."""
    body = [(r["name"], f"{r['out'][0]} -> {r['out'][1]}", f"{r['in'][0]} -> {r['in'][1]}") for r in rows]
    return table(("layer", "out channels", "in channels (Gemm: features)"), body)


def inspect_table(rows: Sequence[InspectRow]) -> str:
    body = [
        (
            r.name, r.op, "x".join(map(str, r.weight_shape)), r.full_rank, r.break_even_rank,
            _dash(r.rank_90), _dash(r.rank_99), _dash(r.rank_999), human(r.params), human(r.macs), r.note,
        )
        for r in rows
    ]
    return table(("layer", "op", "weight", "rank", "break-even", "r@90%", "r@99%", "r@99.9%", "params", "MACs", "note"), body)


def _dash(value: object) -> object:
    return "-" if value is None else value


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def markdown_report(data: dict, figures: Sequence[Path] = ()) -> str:
    """The JSON report (:meth:`PruneResult.to_json` and the run's ``output`` and ``latency``) as
    Markdown, with the figures linked."""
    lines = ["# onnx-basisprune report", ""]
    if "output" in data:
        lines += [f"Output: `{data['output']}`", ""]
    lines += ["## Summary", "", "| | original | pruned | ratio |", "|---|---|---|---|"]
    for key, label in (("params", "params"), ("macs", "MACs (batch 1)")):
        a, b = data["original"][key], data["pruned"][key]
        lines.append(f"| {label} | {_exact(a)} | {_exact(b)} | {_ratio(b, a)} |")
    quality = data.get("quality")
    if quality:
        lines.append(f"| {quality['metric']} (n={quality['n']}) | {quality['original']:.4f} | {quality['pruned']:.4f} | "
                     f"{describe_change(quality['drop'], quality['drop_bound'])} |")
    latency = data.get("latency")
    if latency:
        lines += ["", "## Latency (onnxruntime, median of alternating runs)", "", "| provider | batch | original ms | pruned ms | ratio [95% CI] |", "|---|---|---|---|---|"]
        for provider, rows in latency.items():
            for row in rows:
                ci = f" [{row['ratio_ci'][0]:.3f}, {row['ratio_ci'][1]:.3f}]" if row.get("ratio_ci") else ""
                lines.append(f"| {provider} | {row['batch']} | {row['original_ms']:.3f} | {row['pruned_ms']:.3f} | {row['ratio']:.3f}{ci} |")
        env = data.get("latency_environment", {})
        if env:
            lines += ["", ", ".join(f"{k}: {env[k]}" for k in ("onnxruntime", "cpu", "threads", "date") if k in env)]
    lines += ["", "## Layers", "", "| layer | op | weight | rank | break-even | kept | action | params | → | reason |", "|---|---|---|---|---|---|---|---|---|---|"]
    for layer in data["layers"]:
        kept = "-" if layer["kept_rank"] is None else layer["kept_rank"]
        lines.append(
            f"| `{layer['name']}` | {layer['op']} | {'x'.join(map(str, layer['weight_shape']))} | {layer['full_rank']} | "
            f"{layer['break_even_rank']} | {kept} | {layer['action']} | {layer['params']:,} | {layer['pruned_params']:,} | "
            f"{layer['reason']} |"
        )
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    return "\n".join(lines) + "\n"
