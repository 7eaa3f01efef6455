"""Command line: a thin shell over the Python API.

    onnx-basisprune MODEL.onnx [--calib DIR] [-o OUT.onnx] [targets] [--report R.json]
    onnx-basisprune inspect MODEL.onnx
    onnx-basisprune bench A.onnx [B.onnx ...]

Errors in the user's input print one line and exit with code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import CHANNEL_CRITERIA, CRITERIA, FITS, Preprocessing, PruneConfig
from .errors import BasisPruneError

PROG = "onnx-basisprune"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=1x3x224x224, got '{text}'")
    return name, shape


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in _csv(text))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 1, got '{text}'")
    return sizes


def _providers(text: str) -> tuple[str, ...]:
    from .runtime.session import EP_NAMES

    providers = tuple(p.lower() for p in _csv(text))
    if not providers or any(p not in EP_NAMES for p in providers):
        raise argparse.ArgumentTypeError(f"providers must be a comma list of {', '.join(EP_NAMES)}, got '{text}'")
    return providers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Shrink an exported ONNX CNN by basis scaling: split every Conv/Gemm into an SVD "
        "basis layer and a scaling layer, then drop the bases that matter least, judged on your "
        "calibration data with --calib (the main job), else by singular-value energy.",
        epilog=f"Other modes: '{PROG} inspect MODEL.onnx' (per-layer ranks) and '{PROG} bench A.onnx B.onnx' "
        f"(onnxruntime latency; see '{PROG} bench -h').",
    )
    parser.add_argument("model", help="input ONNX model (never modified)")
    parser.add_argument("-o", "--output", help="output model (default: MODEL.pruned.onnx beside the input)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--energy", type=_fraction, help="keep per layer the bases covering this fraction of the squared singular values (data-free; default 0.99 without --calib)")
    target.add_argument("--target-params", type=_fraction, metavar="F", help="keep this fraction of the parameters")
    target.add_argument("--target-macs", type=_fraction, metavar="F", help="keep this fraction of the MACs")
    target.add_argument("--target-latency", type=_fraction, metavar="F", help="keep this fraction of the latency on --provider, predicted from per-layer timings (implies --latency-aware)")
    target.add_argument("--max-drop", type=float, metavar="P", help="with --calib: strongest pruning whose held-out quality drops at most P points (default 1)")
    target.add_argument("--full-rank", action="store_true", help="only decompose at full rank (same outputs; to check exactness)")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="round kept ranks to this provider's channel block (default cpu)")
    parser.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=None, help="time every layer, original and split at aligned ranks, on --provider (cached) and split a layer only where that is faster (default: on for --max-drop and --target-latency, off for params/MACs budgets)")
    parser.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=DIMS", help="shape for an input with symbolic non-batch dims, e.g. input=1x3x224x224")
    parser.add_argument("--report", metavar="R.json", help="write the JSON report here")
    parser.add_argument("--report-md", metavar="R.md", help="write a Markdown report here, with PNG figures beside it (sweep, kept ranks)")
    parser.add_argument("--no-bench", action="store_true", help="skip every timing: the search's candidates, the final speed check and the before/after table")
    parser.add_argument("--bench-batch", type=_batches, default=(1, 8), metavar="B,B", help="batch sizes for the before/after latency and for --latency-aware timings (default 1,8)")
    calib = parser.add_argument_group("calibration (the main job)")
    calib.add_argument("--calib", metavar="DATA", help="target-domain images (folder with class subfolders, or flat) or .npy/.npz arrays")
    calib.add_argument("--eval", metavar="DATA", help="separate held-out data for quality checks (default: a split of --calib)")
    calib.add_argument("--labels", metavar="FILE", help="map class folder names to output indices (one name per line, or JSON)")
    calib.add_argument("--unlabeled", action="store_true", help="ignore the labels of the data: quality is top-1 agreement with the original model, importance uses its own predictions (automatic when the class folders cannot be the model's outputs)")
    calib.add_argument("--holdout", type=_fraction, default=0.3, help="fraction of --calib kept back for quality checks (default 0.3)")
    calib.add_argument("--limit", type=int, help="use at most this many calibration samples")
    calib.add_argument("--criterion", choices=CRITERIA, default=None, help="how ranks are allocated across layers: fisher (the default) ranks the bases of the data-aware split by their output error weighted by the loss's Fisher sensitivity to each output; energy, taylor, taylor-sq rank the weight-SVD bases by output energy s_i^2 E[b_i^2], first-order Taylor |mean s*dL/ds| (Molchanov 2016, the paper's) or squared Taylor (Molchanov 2019)")
    calib.add_argument("--fit", choices=FITS, default=None, help="sequential (the default): refit every layer in graph order on the inputs the pruned model produces, with the bases that best reproduce the original output; independent: weight-SVD bases with least-squares scaling from the original model's activations (the earlier method)")
    calib.add_argument("--tune", action="store_true", help="after the fit, tune the kept bases' scaling factors and the refitted layers' biases (nothing else) for 300 steps so that the pruned model's outputs match the original's on the calibration images (off by default: on ResNet-56 it gave no gain on test images and took minutes)")
    calib.add_argument("--double", action="store_true", help="double pruning: remove whole channels first (Taylor importance of coupled channel groups), then bases, under the same target")
    calib.add_argument("--channel-criterion", choices=CHANNEL_CRITERIA, default=None, help="with --double: channel importance, first-order (Molchanov 2016) or per-example squared (2019) Taylor (the default: it measured best, see README)")
    calib.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default 32)")
    calib.add_argument("--device", choices=("cpu", "cuda"), help="Torch device for importance (default: cuda when available)")
    calib.add_argument("--seed", type=int, default=0)
    pre = parser.add_argument_group("preprocessing overrides (default: inferred from the model input; printed)")
    pre.add_argument("--resize", type=int, help="resize the short side to this many pixels")
    pre.add_argument("--crop", type=int, help="centre-crop to this size")
    pre.add_argument("--scale", type=float, help="multiply pixels by this (default 1/255)")
    pre.add_argument("--mean", type=lambda s: tuple(float(v) for v in s.split(",")), help="per-channel mean, e.g. 0.485,0.456,0.406")
    pre.add_argument("--std", type=lambda s: tuple(float(v) for v in s.split(",")), help="per-channel std")
    pre.add_argument("--bgr", action="store_true", help="feed channels in BGR order")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def default_output(model: Path) -> Path:
    name = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(name + ".pruned.onnx")


def check_output(model: Path, output: Path) -> None:
    """Fail early (before any long work) if the output can't be written or would replace the input."""
    if output.resolve() == model.resolve():
        raise BasisPruneError(f"{output}: refusing to overwrite the input model")
    if output.is_dir():
        raise BasisPruneError(f"{output}: output path is a directory")
    if not output.parent.is_dir():
        raise BasisPruneError(f"{output}: output folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise BasisPruneError(f"{output}: output folder is not writable")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The run's options from the parsed command line."""
    return PruneConfig(
        calib=args.calib, eval=args.eval, labels=args.labels, unlabeled=args.unlabeled, holdout=args.holdout,
        limit=args.limit, energy=args.energy, target_params=args.target_params, target_macs=args.target_macs,
        target_latency=args.target_latency, max_drop=args.max_drop, full_rank=args.full_rank, double=args.double,
        criterion=args.criterion, fit=args.fit or "sequential", tune=args.tune, channel_criterion=args.channel_criterion,
        provider=args.provider, latency_aware=args.latency_aware, latency_batches=args.bench_batch,
        time_candidates=not args.no_bench, check_speed=not args.no_bench, input_shapes=dict(args.input_shape) or None,
        preprocessing=Preprocessing(args.resize, args.crop, args.scale, args.mean, args.std, args.bgr),
        batch_size=args.batch_size, device=args.device, seed=args.seed,
    )


def run_prune(args: argparse.Namespace) -> int:
    from .api import run
    from .report.tables import channel_table, file_size, layer_table, summary_table, write_json
    from .io.shapes import unsized_inputs

    model_path = Path(args.model)
    output = Path(args.output) if args.output else default_output(model_path)
    check_output(model_path, output)
    for extra in (args.report, args.report_md):
        if extra:
            check_output(model_path, Path(extra))
    config = config_from_args(args)
    start = time.perf_counter()
    result = run(model_path, config)
    result.save(output)
    seconds = round(time.perf_counter() - start, 2)
    if result.channels:
        print(channel_table(result.channels))
        print()
    print(layer_table(result.layers))
    print()
    print(summary_table(result, file_size(model_path), file_size(output)))
    print(f"\nwrote {output}")
    unsized = unsized_inputs(result.model, result.input_shapes)
    if unsized:
        print(f"MACs and latency not measured: input '{unsized[0].name}' has a symbolic size (give --input-shape)")
    elif not args.no_bench:
        check = result.speed_check
        checked = {check.provider: check.latency} if check else {}
        latency, environment = _latency(model_path, output, args.bench_batch, result.input_shapes, skip=tuple(checked))
        result.latency = {**checked, **latency}
        result.latency_environment = environment or (check.environment if check else None)
        measured = {row["batch"]: row["ratio"] for row in result.latency.get(args.provider, [])}
        if result.predicted_latency_ratio is not None and 1 in measured:
            print(f"latency ratio on {args.provider} at batch 1: predicted {result.predicted_latency_ratio:.3f}, "
                  f"measured {measured[1]:.3f}")
    report = {**result.to_json(), "output": str(output), "seconds": seconds}
    if args.report:
        write_json(report, args.report)
        print(f"wrote {args.report}")
    if args.report_md:
        _write_markdown(result, report, Path(args.report_md))
        print(f"wrote {args.report_md}")
    return 0


def _write_markdown(result, report: dict, path: Path) -> None:
    from .report.figures import ranks_figure, sweep_figure
    from .report.tables import markdown_report

    stem = path.with_suffix("")
    figures = [f for f in (sweep_figure(result, f"{stem}.sweep.png"), ranks_figure(result, f"{stem}.ranks.png")) if f]
    path.write_text(markdown_report(report, figures), encoding="utf-8")


def _latency(original: Path, pruned: Path, batches: tuple[int, ...], shapes,
             skip: tuple[str, ...] = ()) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Time original vs pruned on every working provider but those in ``skip`` (timed already by
    the speed check), alternating runs; print the table."""
    from .runtime.bench import BenchConfig, benchmark, format_bench
    from .runtime.session import available_providers
    from .runtime.speed_check import latency_rows

    providers = tuple(p for p in available_providers() if p not in skip)
    if not providers:
        return {}, {}
    config = BenchConfig(providers=providers, batches=batches, input_shapes=shapes)
    bench = benchmark([original, pruned], config, names=["original", "pruned"])
    print()
    print(format_bench(bench))
    return latency_rows(bench), bench.environment


def run_inspect(argv: Sequence[str]) -> int:
    from .api import inspect
    from .report.tables import human, inspect_table

    parser = argparse.ArgumentParser(prog=f"{PROG} inspect", description="Per layer: op, weight shape, full rank, break-even rank, ranks at 90/99/99.9%% energy, params and MACs.")
    parser.add_argument("model")
    parser.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=DIMS")
    args = parser.parse_args(argv)
    prepared, rows = inspect(args.model, dict(args.input_shape) or None)
    print(inspect_table(rows))
    print(f"\n{len(rows)} layers, {sum(not r.note for r in rows)} splittable; model params {human(prepared.original.params)}, MACs {human(prepared.original.macs)}")
    return 0


def bench_parser() -> argparse.ArgumentParser:
    """``onnx-basisprune bench MODEL.onnx [MODEL.onnx ...]``."""
    from .runtime.bench import BenchConfig
    from .runtime.session import ALGO_SEARCH_CHOICES

    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog=f"{PROG} bench", description="Time ONNX models on onnxruntime, alternating between them; ratios are to the first model.")
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL.onnx", help="models to compare; ratios are relative to the first")
    parser.add_argument("--providers", type=_providers, default=defaults.providers, help="comma list of cpu, cuda, tensorrt (default: cpu)")
    parser.add_argument("--batch", dest="batches", type=_batches, default=defaults.batches, help="comma list of batch sizes (default: 1,8)")
    parser.add_argument("--threads", type=_positive_int, default=defaults.threads, help="intra-op threads (default: physical cores)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up runs per model")
    parser.add_argument("--rounds", type=_positive_int, default=defaults.rounds, help="timed runs per model")
    parser.add_argument("--min-time", dest="min_time_s", type=float, default=defaults.min_time_s,
                        help="add rounds until each model ran this many seconds (at most 10x rounds)")
    parser.add_argument("--cudnn-algo-search", dest="cudnn_conv_algo_search", choices=ALGO_SEARCH_CHOICES,
                        default=defaults.cudnn_conv_algo_search, help="cuDNN convolution algorithm search")
    parser.add_argument("--input-shape", dest="input_shapes", type=_shape_arg, action="append",
                        metavar="NAME=1x3x224x224", help="shape for an input with symbolic dims (repeatable)")
    parser.add_argument("--json", dest="json_out", type=Path, metavar="OUT.json", help="also write the result as JSON")
    return parser


def run_bench(argv: Sequence[str]) -> int:
    """Run ``bench``: print the table, write JSON if asked."""
    from .runtime.bench import BenchConfig, benchmark, format_bench

    args = bench_parser().parse_args(argv)
    config = BenchConfig(providers=tuple(args.providers), batches=tuple(args.batches), threads=args.threads,
                         warmup=args.warmup, rounds=args.rounds, min_time_s=args.min_time_s,
                         cudnn_conv_algo_search=args.cudnn_conv_algo_search,
                         input_shapes=dict(args.input_shapes) if args.input_shapes else None)
    result = benchmark(args.models, config)
    print(format_bench(result))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "inspect":
            return run_inspect(argv[1:])
        if argv and argv[0] == "bench":
            return run_bench(argv[1:])
        return run_prune(build_parser().parse_args(argv))
    except (BasisPruneError, ValueError) as exc:
        print(f"{PROG}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
