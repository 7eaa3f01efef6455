"""The benchmark suite: onnx-basisprune on real pretrained networks and real target-domain data,
side by side with the paper's criterion, data-free truncation and the pruning tools a user would
pick instead (Torch-Pruning, onnxsim), all without fine-tuning.

    .venv/bin/python benchmarks/run_benchmarks.py [--quick] [--cases NAME,...] [--out DIR]

Per case (model, calibration images, test images, all from ../shared or built by
``benchmarks/transfer_models.py``):

* the original: params, MACs, file size, test accuracy, CPU latency;
* the paper's operating point: the main job with ``--max-drop 1`` (the strongest basis pruning
  whose accuracy on a held-out 30 % of the *calibration* images stays within 1 point; the test
  images are never seen), bases only and ``--double``;
* a sweep over MACs budgets: onnx-basisprune with each criterion (energy, the default; taylor, the
  paper's first-order form; taylor-sq), data-free singular-value truncation, and the baselines
  (``benchmarks/baselines.py``) at the same MACs;
* CPU latency (onnxruntime, 2 threads, batch 1 and 8, alternating runs) of every model, as a
  ratio to the original.

Writes ``DIR/<case>.json`` (everything measured, with the commands and versions) and
``DIR/<case>.png`` (accuracy against params, MACs and latency), then rebuilds
``benchmarks/RESULTS.md`` from every case JSON in ``DIR``. ``--quick`` runs one small case
(ResNet-20 / CIFAR-10 subsets) end to end into ``build/benchmarks/quick`` in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small SVDs: threads only spin

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
SHARED = ROOT.parent / "shared"
MODELS = ROOT / "build" / "benchmarks" / "models"
DATA = ROOT / "build" / "benchmarks" / "data"
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
THREADS = 2
CRITERIA = ("energy", "taylor", "taylor-sq")
BASELINES = ("torch-pruning", "onnxsim-l2", "onnxsim-wanda")
WANDA_LIMIT = 512


def _relative(path: Path) -> str:
    """``path`` relative to the repository (``../shared/...`` for the shared assets), so records
    do not carry the absolute paths of the machine they ran on."""
    return os.path.relpath(path, ROOT)


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    model: Path
    calib: Path
    test: Path
    limit: int  # calibration images (30 % of them held out for the --max-drop search)
    sweep: tuple[float, ...]  # MACs fractions
    test_limit: int | None = None  # None: the whole test folder
    double: tuple[float, ...] | None = None  # MACs budgets for --double beside max-drop 1 (None: the sweep; () none)
    notes: str = ""


def cases(shared: Path) -> list[Case]:
    c10 = shared / "data" / "cifar10"
    return [
        Case("mobilenet_v2_cifar10", "MobileNetV2 ImageNet → CIFAR-10 (the paper's setting)", MODELS / "mobilenet_v2_cifar10.onnx",
             c10 / "train", c10 / "test", 3000, (0.9, 0.8, 0.7, 0.6), double=(0.7, 0.6)),
        Case("mobilenet_v2_hymenoptera", "MobileNetV2 ImageNet → ants/bees", MODELS / "mobilenet_v2_hymenoptera.onnx",
             shared / "data" / "hymenoptera" / "train", shared / "data" / "hymenoptera" / "val", 244, (0.9, 0.8, 0.7, 0.6),
             double=(0.7, 0.6),
             notes="All 243 training images calibrate (170 for importance, 73 held out for the search: one image is 1.4 "
                   "points there, so `--max-drop 1` allows no error); 153 val images test (one image is 0.65 points)."),
        Case("resnet56_cifar10", "ResNet-56 on CIFAR-10 (the classic pruning benchmark)", shared / "models" / "resnet56_cifar10.onnx",
             c10 / "train", c10 / "test", 3000, (0.9, 0.8, 0.7, 0.6)),
        Case("resnet56_fashion_mnist", "ResNet-56 CIFAR-10 → Fashion-MNIST", MODELS / "resnet56_fashion_mnist.onnx",
             DATA / "fashion-mnist" / "train", DATA / "fashion-mnist" / "test", 3000, (0.9, 0.8, 0.7, 0.6)),
    ]


QUICK = Case("quick_resnet20_cifar10", "ResNet-20 on CIFAR-10 (--quick: 1,500 calibration, 1,000 test images)",
             SHARED / "models" / "resnet20_cifar10.onnx", SHARED / "data" / "cifar10" / "train", SHARED / "data" / "cifar10" / "test",
             1500, (0.8, 0.6), test_limit=1000, double=())  # 450 held out: enough to certify --max-drop 1


# --------------------------------------------------------------------------- measuring


@dataclass
class Row:
    """One model of a case."""

    method: str  # "original", "basisprune", "basisprune --double", "energy truncation", a baseline
    criterion: str = ""
    target: str = ""  # "max-drop 1", "macs 0.8", ...
    params: int = 0
    macs: int = 0
    file_bytes: int = 0
    test_accuracy: float | None = None
    test_n: int = 0
    latency: dict[str, float] = field(default_factory=dict)  # "b1"/"b8" -> ratio to the original
    latency_ms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # producing the model (calibration, search), not the test
    note: str = ""
    path: str = ""
    unseen_only: bool = False  # searched on the validation half of the test images: tested on the other half


class Tester:
    """Test accuracy with onnxruntime on the case's test images, loaded once by the tool's loader.
    The test images are also split in two stratified halves: ``validation`` (what a user would
    pass as ``--eval``) and ``unseen`` (the test images of the rows searched on ``validation``)."""

    def __init__(self, model: Path, folder: Path, limit: int | None):
        from onnx_basisprune.calibration.data import InputSpec, load_calibration

        self.data = load_calibration(folder, InputSpec.from_model(onnx.load(str(model), load_external_data=False)),
                                     limit=limit, seed=0)
        self.unseen, self.validation = self.data.split(0.5, seed=0)

    def accuracy(self, model: Path, unseen_only: bool = False) -> tuple[float, int]:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = THREADS
        sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        data = self.unseen if unseen_only else self.data
        preds = [sess.run(None, feeds)[0].argmax(1) for feeds, _ in data.batches(250)]
        return float((np.concatenate(preds) == data.labels).mean()), len(data)


def measure(rows: Sequence[Row], original: Path, tester: Tester) -> None:
    """Test accuracy and file size of each row's model; CPU latency of all of them against the
    original, timed alternately in one run per batch size."""
    from onnx_basisprune.bench import BenchConfig, benchmark

    for row in rows:
        if row.path and row.test_accuracy is None:
            row.test_accuracy, row.test_n = tester.accuracy(Path(row.path), row.unseen_only)
        if row.path:
            row.file_bytes = Path(row.path).stat().st_size
    timed = [row for row in rows if row.path]
    config = BenchConfig(providers=("cpu",), batches=(1, 8), threads=THREADS, warmup=10, rounds=40)
    result = benchmark([str(original)] + [row.path for row in timed], config)
    for case in result.cases:
        for row, timing in zip(timed, case.timings[1:]):
            row.latency[f"b{case.batch}"] = round(timing.ratio, 4)
            row.latency_ms[f"b{case.batch}"] = round(timing.median_ms, 4)
    return None


def _args(case: Case, out: Path, extra: Sequence[str] = ()) -> argparse.Namespace:
    from onnx_basisprune.cli import build_parser

    return build_parser().parse_args([str(case.model), "--calib", str(case.calib), "--limit", str(case.limit),
                                      "-o", str(out), *extra])


def _save(result, path: Path) -> str:
    from onnx_basisprune.modelio import save_model

    save_model(result.model, path)
    return str(path)


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def ours(case: Case, work: Path, tester: Tester) -> tuple[list[Row], dict]:
    """onnx-basisprune: the operating point (bases, double) and the MACs sweep per criterion,
    from one importance pass; data-free truncation at the same budgets. The operating points
    again with the search on the validation half of the test images (``--eval``)."""
    from onnx_basisprune.api import prepare, prune
    from onnx_basisprune.calibrated import CalibrationData, Target, basis_importance, basis_stage, load_calibration_data
    from onnx_basisprune.errors import BasisPruneError
    from onnx_basisprune.search import Evaluator

    rows: list[Row] = []
    args = _args(case, work / "unused.onnx", ["--no-bench"])
    (prepared, data), load_s = _timed(lambda: (lambda p: (p, load_calibration_data(p, args)))(prepare(case.model)))
    measured, importance_s = _timed(lambda: basis_importance(prepared, data, verbose=False))
    info = {"calibration": {"samples": len(data.calib), "heldout": data.evaluator.n, "heldout_metric": data.evaluator.metric,
                            "heldout_original": data.evaluator.original, "importance_seconds": round(importance_s, 1),
                            "load_seconds": round(load_s, 1)}}
    for criterion in CRITERIA:
        args.criterion = criterion
        for target in [Target("max-drop", 1.0)] + [Target("macs", f) for f in case.sweep]:
            label = "max-drop 1" if target.kind == "max-drop" else f"macs {target.value:g}"
            try:
                result, seconds = _timed(lambda: basis_stage(prepared, data, target, prepared.original, verbose=False,
                                                             time_candidates=False, measured=measured))
            except BasisPruneError as exc:
                rows.append(Row("basisprune", criterion, label, note=str(exc)))
                continue
            path = _save(result, work / f"basisprune.{criterion}.{label.replace(' ', '')}.onnx")
            rows.append(Row("basisprune", criterion, label, result.pruned.params, result.pruned.macs,
                            seconds=round(importance_s + seconds, 1), path=path,
                            note=f"held-out {result.extra['quality']['metric']} {result.extra['quality']['pruned']:.4f}"))
    args.criterion, args.latency_aware = None, True  # split only where the measured pair is faster
    result, seconds = _timed(lambda: basis_stage(prepared, data, Target("max-drop", 1.0), prepared.original, verbose=False,
                                                 time_candidates=False, measured=measured))
    rows.append(Row("basisprune --latency-aware", "energy", "max-drop 1", result.pruned.params, result.pruned.macs,
                    seconds=round(importance_s + seconds, 1), path=_save(result, work / "basisprune.latency_aware.onnx"),
                    note=f"predicted CPU latency ratio {result.extra['predicted_latency_ratio']:.3f}"))
    args.latency_aware = False
    for layer in prepared.layers.values():
        layer.measured_break_even = None
    for f in case.sweep:
        try:
            result, seconds = _timed(lambda: prune(case.model, target_macs=f))
        except BasisPruneError as exc:
            rows.append(Row("energy truncation", "data-free", f"macs {f:g}", note=str(exc)))
            continue
        path = _save(result, work / f"energy_truncation.macs{f:g}.onnx")
        rows.append(Row("energy truncation", "data-free", f"macs {f:g}", result.pruned.params, result.pruned.macs,
                        seconds=round(seconds, 1), path=path))
    validated = CalibrationData(data.calib, Evaluator(lambda: tester.validation.batches(64), tester.validation.labels,
                                                      prepared.model), data.loss, args)
    args.criterion = None
    result, seconds = _timed(lambda: basis_stage(prepared, validated, Target("max-drop", 1.0), prepared.original,
                                                 verbose=False, time_candidates=False, measured=measured))
    rows.append(Row("basisprune", "energy", "max-drop 1, --eval", result.pruned.params, result.pruned.macs,
                    seconds=round(importance_s + seconds, 1), path=_save(result, work / "basisprune.validated.onnx"),
                    note=f"validation accuracy {result.extra['quality']['pruned']:.4f}", unseen_only=True))
    if case.double != ():
        from onnx_basisprune.double import channel_stage, double_prune

        stage, channel_s = _timed(lambda: channel_stage(prepared, data))
        result, seconds = _timed(lambda: double_prune(prepared, validated, Target("max-drop", 1.0), stage))
        rows.append(Row("basisprune --double", "energy", "max-drop 1, --eval", result.pruned.params, result.pruned.macs,
                        seconds=round(channel_s + seconds, 1), path=_save(result, work / "double.validated.onnx"),
                        note=f"channel share {_share(result)}, validation accuracy {result.extra['quality']['pruned']:.4f}",
                        unseen_only=True))
        for target in [Target("max-drop", 1.0)] + [Target("macs", f) for f in (case.sweep if case.double is None else case.double)]:
            label = "max-drop 1" if target.kind == "max-drop" else f"macs {target.value:g}"
            try:
                result, seconds = _timed(lambda: double_prune(prepared, data, target, stage))
            except BasisPruneError as exc:
                rows.append(Row("basisprune --double", "energy", label, note=str(exc)))
                continue
            path = _save(result, work / f"double.{label.replace(' ', '')}.onnx")
            rows.append(Row("basisprune --double", "energy", label, result.pruned.params, result.pruned.macs,
                            seconds=round(channel_s + seconds, 1), path=path,
                            note=f"channel share {_share(result)}, held-out {result.extra['quality']['pruned']:.4f}"))
    return rows, info


def _share(result) -> str:
    share = result.extra["double"]["chosen_share"]
    return "none (bases only)" if share is None else f"{share:.2g}"


def baselines(case: Case, work: Path) -> list[Row]:
    from baselines import run_baselines

    results = run_baselines(case.model, case.calib, None, "macs", list(case.sweep), BASELINES[:2], limit=case.limit,
                            out_dir=work, progress=False)
    # Wanda runs its calibration at every trial of the sparsity search: a 512-image subset of the
    # same calibration images keeps it within minutes (its activation norms settle long before).
    results += run_baselines(case.model, case.calib, None, "macs", list(case.sweep), BASELINES[2:], limit=min(case.limit, WANDA_LIMIT),
                             out_dir=work, progress=False)
    return [Row(r.method, "", f"macs {r.target:g}", r.params, r.macs, seconds=round(r.seconds, 1),
                path=r.model_path if r.reached or r.model_path else "", note=r.note) for r in results]


def run_case(case: Case, out: Path) -> dict:
    from onnx_basisprune.api import prepare

    work = ROOT / "build" / "benchmarks" / case.name
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"=== {case.title}", flush=True)
    tester = Tester(case.model, case.test, case.test_limit)
    original = prepare(case.model).original
    rows = [Row("original", params=original.params, macs=original.macs, path=str(case.model))]
    our_rows, info = ours(case, work, tester)
    rows += our_rows
    print(f"  onnx-basisprune done ({time.perf_counter() - started:.0f} s)", flush=True)
    rows += baselines(case, work)
    print(f"  baselines done ({time.perf_counter() - started:.0f} s)", flush=True)
    measure(rows, case.model, tester)
    unseen_accuracy, unseen_n = tester.accuracy(case.model, unseen_only=True)
    record = {
        "case": case.name, "title": case.title, "notes": case.notes,
        "model": _relative(case.model), "calib": _relative(case.calib), "test": _relative(case.test),
        "calib_limit": case.limit, "test_n": len(tester.data), "sweep_macs": list(case.sweep),
        "unseen": {"n": unseen_n, "original_accuracy": unseen_accuracy},
        **info,
        "rows": [row.__dict__ for row in rows],
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment(),
        "command": f".venv/bin/python benchmarks/run_benchmarks.py --cases {case.name}",
    }
    (out / f"{case.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    figure(record, out / f"{case.name}.png")
    print(f"  done in {record['seconds']:.0f} s", flush=True)
    return record


def environment() -> dict[str, str]:
    import torch

    from onnx_basisprune.bench import _cpu_model

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": _cpu_model(),
            "cores": str(len(os.sched_getaffinity(0))), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
            "numpy": np.__version__}


# --------------------------------------------------------------------------- reporting


def figure(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    original = rows[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    styles = {"basisprune energy": ("tab:blue", "o-"), "basisprune taylor": ("tab:cyan", "^--"),
              "basisprune taylor-sq": ("tab:purple", "v--"), "energy truncation data-free": ("tab:grey", "s:"),
              "basisprune --double energy": ("tab:red", "D-"), "torch-pruning ": ("tab:green", "P-"),
              "onnxsim-l2 ": ("tab:olive", "x-"), "onnxsim-wanda ": ("tab:orange", "*-")}
    for key, (colour, style) in styles.items():
        method, _, criterion = key.rpartition(" ") if key.endswith(tuple(CRITERIA) + ("data-free",)) else (key.strip(), "", "")
        points = [r for r in rows if r["method"] == method and (r["criterion"] == criterion or not criterion)
                  and r["test_accuracy"] is not None and r["target"].startswith("macs")]
        if not points:
            continue
        for ax, x in zip(axes, ("params", "macs", "latency")):
            xs = [r["latency"].get("b1") if x == "latency" else r[x] / original[x] for r in points]
            order = np.argsort(xs)
            ax.plot(np.asarray(xs)[order], np.asarray([r["test_accuracy"] for r in points])[order], style, color=colour,
                    label=key.strip(), markersize=5)
        for r in rows:  # the operating points
            if r["method"] == method and r["target"] == "max-drop 1" and (r["criterion"] == criterion or not criterion):
                for ax, x in zip(axes, ("params", "macs", "latency")):
                    xv = r["latency"].get("b1") if x == "latency" else r[x] / original[x]
                    ax.plot([xv], [r["test_accuracy"]], "*", color=colour, markersize=15, markeredgecolor="black")
    for ax, label in zip(axes, ("params kept (fraction)", "MACs kept (fraction)", "CPU latency, batch 1 (ratio)")):
        ax.axhline(original["test_accuracy"], color="black", linestyle=":", linewidth=1)
        ax.axhline(original["test_accuracy"] - 0.01, color="black", linestyle="--", linewidth=0.7)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy (n={record['test_n']})")
    axes[0].legend(fontsize=7, loc="lower right")
    low = min((r["test_accuracy"] for r in rows if r["test_accuracy"] is not None), default=0)
    axes[0].set_ylim(max(low - 0.02, original["test_accuracy"] - 0.25), original["test_accuracy"] + 0.02)
    fig.suptitle(f"{record['title']}: no fine-tuning (stars: --max-drop 1 on held-out calibration images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def case_markdown(record: dict) -> str:
    rows = record["rows"]
    original = rows[0]
    acc0 = original["test_accuracy"]
    lines = [f"## {record['title']}", "",
             f"Model `{record['model']}`; calibration `{record['calib']}` ({record['calibration']['samples']} images for importance, "
             f"{record['calibration']['heldout']} held out for the `--max-drop` search); test `{record['test']}` "
             f"({record['test_n']} images, never used for pruning). {record['notes']}", "",
             f"Rerun: `{record['command']}` ({record['seconds']:.0f} s in all on {record['environment']['cpu']}, "
             f"{record['environment']['date'][:10]}).", "",
             f"Rows marked `--eval` searched on a validation half of the test images ({record['unseen']['n']} images) "
             f"and are tested on the other half (original accuracy there {_pct(record['unseen']['original_accuracy'])} %); "
             "all other rows are tested on all test images.", "",
             "| method | criterion | target | params kept | MACs kept | size kept | test acc. % (Δ pt) | CPU latency b1 / b8 | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] != "original" and r["params"] == 0:
            lines.append(f"| {r['method']} | {r['criterion']} | {r['target']} | not reached: {r['note']} | | | | | |")
            continue
        base = record["unseen"]["original_accuracy"] if r.get("unseen_only") else acc0
        delta = "" if r["method"] == "original" or r["test_accuracy"] is None else f" ({100 * (r['test_accuracy'] - base):+.2f})"
        lat = " / ".join(f"{r['latency'][b]:.3f}" if b in r["latency"] else "-" for b in ("b1", "b8"))
        if r["method"] == "original":
            lat = " / ".join(f"{r['latency_ms'].get(b, 0):.2f} ms" for b in ("b1", "b8")) if r["latency_ms"] else "-"
        lines.append(f"| {r['method']} | {r['criterion']} | {r['target']} | {r['params'] / original['params']:.3f} | "
                     f"{r['macs'] / original['macs']:.3f} | {r['file_bytes'] / max(original['file_bytes'], 1):.3f} | "
                     f"{_pct(r['test_accuracy'])}{delta} | {lat} | {r['seconds']:.0f} |")
    lines += ["", f"![{record['case']}](results/{record['case']}.png)", ""]
    lines += verdicts(record)
    return "\n".join(lines) + "\n"


def verdicts(record: dict) -> list[str]:
    """What the numbers say about the goals: the paper's bar, the baselines at equal MACs, and
    the latency target (CPU latency ratio <= 1.1 x MACs ratio at the operating point)."""
    rows = record["rows"]
    original = rows[0]
    acc0 = original["test_accuracy"]
    out = []
    operating = [(m, t) for m in ("basisprune", "basisprune --double") for t in ("max-drop 1, --eval", "max-drop 1")]
    for method, target in operating[:2] + [("basisprune --latency-aware", "max-drop 1")] + operating[2:]:
        op = next((r for r in rows if r["method"] == method and r["target"] == target and r["criterion"] == "energy"), None)
        if op is None or op["test_accuracy"] is None:
            continue
        removed = 1 - op["params"] / original["params"]
        drop = 100 * ((record["unseen"]["original_accuracy"] if op.get("unseen_only") else acc0) - op["test_accuracy"])
        macs = op["macs"] / original["macs"]
        lat = [op["latency"].get(b) for b in ("b1", "b8")]
        lat_ok = all(v is not None and v <= 1.1 * macs for v in lat)
        out.append(f"* `{method}` at `{target}`: {100 * removed:.1f} % of the parameters removed (paper: 74.6 % on CIFAR-10) "
                   f"for a test accuracy change of {-drop:+.2f} points; MACs ratio {macs:.3f}, CPU latency ratio b1/b8 "
                   f"{' / '.join('-' if v is None else f'{v:.3f}' for v in lat)}: "
                   f"{'within' if lat_ok else 'NOT within'} 1.1 x the MACs ratio.")
    ours = {r["target"]: r for r in rows if r["method"] == "basisprune" and r["criterion"] == "energy"}
    best_double = {r["target"]: r for r in rows if r["method"] == "basisprune --double"}
    for r in rows:
        if r["method"] in BASELINES and r["test_accuracy"] is not None and r["target"] in ours:
            candidates = [x for x in (ours.get(r["target"]), best_double.get(r["target"])) if x is not None and x["test_accuracy"] is not None]
            if not candidates:
                out.append(f"* {r['target']}: onnx-basisprune does not reach this budget ({ours[r['target']]['note']}); "
                           f"{r['method']} {_pct(r['test_accuracy'])} %.")
                continue
            mine = max(candidates, key=lambda x: x["test_accuracy"])
            verdict = "beats" if mine["test_accuracy"] > r["test_accuracy"] else "does NOT beat"
            out.append(f"* {r['target']}: onnx-basisprune ({mine['method']}, MACs {mine['macs'] / original['macs']:.3f}) "
                       f"{_pct(mine['test_accuracy'])} % {verdict} {r['method']} (MACs {r['macs'] / original['macs']:.3f}) "
                       f"{_pct(r['test_accuracy'])} %.")
    return out


TRANSFER_JSON = "transfer_models.json"  # copied beside the case records from MODELS


def transfer_markdown(models: dict) -> list[str]:
    """How each transfer model was built (benchmarks/transfer_models.py's record)."""
    lines = ["## Transfer models", "",
             "Built by `.venv/bin/python benchmarks/transfer_models.py` (recipe in its docstring; seeds fixed, 2 Torch threads).", "",
             "| model | base | input | trained layers | epochs | train images | augmentation | training time | accuracy (onnxruntime) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        r = m["recipe"]
        held = m.get("test") or m.get("val") or {}
        acc = f"{_pct(held.get('accuracy'))} % of {held.get('images', '?')} {'test' if 'test' in m else 'val'} images"
        lines.append(f"| `{m['file']}` | {r.get('base', '')} | {r['resolution']} px | {r['trainable']} | "
                     f"{r['epochs']} | {m['train_images']} | {r.get('augmentation', '')} | {m['train_time_s']:.0f} s | {acc} |")
    return lines + [""]


def write_results(out: Path, target: Path = RESULTS_MD) -> None:
    if (MODELS / TRANSFER_JSON).exists():
        shutil.copyfile(MODELS / TRANSFER_JSON, out / TRANSFER_JSON)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != TRANSFER_JSON]
    order = {c.name: i for i, c in enumerate(cases(SHARED))}
    records.sort(key=lambda r: order.get(r["case"], len(order)))
    env = records[0]["environment"] if records else environment()
    header = [
        "# Benchmark results", "",
        "Written by `benchmarks/run_benchmarks.py` (do not edit by hand). Every number below was measured by that script; "
        "rerun one case with the command under its heading, or everything with `.venv/bin/python benchmarks/run_benchmarks.py` "
        "after `.venv/bin/python benchmarks/transfer_models.py` (builds the transfer models into `build/benchmarks/models`).", "",
        f"Machine: {env['cpu']}, {env['cores']} cores; Python {env['python']}, onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, "
        f"torch {env['torch']}, numpy {env['numpy']}. No GPU. Latency: onnxruntime CPU provider, {THREADS} threads, "
        "ORT_ENABLE_ALL, models timed alternately with the original; ratios are pruned / original medians.", "",
        "Protocol: nothing is fine-tuned. Calibration images come from the training split; onnx-basisprune holds out 30 % of them "
        "to search the strongest pruning within 1 point (`--max-drop 1`); test accuracy is measured on the separate test split. "
        "Sweep rows are budgets of MACs (the fraction that remains); the baselines are searched to the same MACs. "
        "`size kept` is the ONNX file size ratio.", "",
    ]
    missing = [c for c in cases(SHARED) if c.name not in {r["case"] for r in records}]
    if missing and target == RESULTS_MD:
        header += ["Not measured in this results set (no record in `benchmarks/results`): "
                   + "; ".join(f"{c.title} (`--cases {c.name}`)" for c in missing) + ".", ""]
    if (out / TRANSFER_JSON).exists():
        header += transfer_markdown(json.loads((out / TRANSFER_JSON).read_text()))
    body = [case_markdown(r) for r in records]
    target.write_text("\n".join(header) + "\n" + "\n".join(body))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small case end to end (ResNet-20, subsets), a few minutes")
    parser.add_argument("--cases", help="comma-separated case names (default: all whose files exist)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; build/benchmarks/quick with --quick)")
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    if args.quick:
        selected = [QUICK]
        out = args.out or ROOT / "build" / "benchmarks" / "quick"
    else:
        wanted = set(args.cases.split(",")) if args.cases else None
        selected = [c for c in cases(args.shared) if wanted is None or c.name in wanted]
        if wanted and len(selected) != len(wanted):
            parser.error(f"unknown case in {sorted(wanted)}; cases: {', '.join(c.name for c in cases(args.shared))}")
        out = args.out or RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    for case in selected:
        missing = [p for p in (case.model, case.calib, case.test) if not p.exists()]
        if missing:
            print(f"=== {case.title}: skipped, {missing[0]} is missing", flush=True)
            continue
        run_case(case, out)
    write_results(out, out / "RESULTS.md" if args.quick or args.out else RESULTS_MD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
