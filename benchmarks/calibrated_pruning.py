"""Benchmark of the main job (``--calib``) on real networks: params, MACs, latency and accuracy
on an independent test set, before and after.

Protocol per case: calibrate on training images (``--limit`` of them; the tool keeps 30 % of
those back to search the strongest pruning within ``--max-drop`` points), then measure accuracy
of the original and pruned model with onnxruntime on the *test* images, which the tool never saw.

    .venv/bin/python benchmarks/calibrated_pruning.py [--cases digits,resnet56,...] [--criteria energy,taylor,taylor-sq]

Writes benchmarks/results/calibrated_pruning.json and the table in benchmarks/RESULTS.md.
Cases whose model or data is absent (../shared, or the transfer models built by
benchmarks/transfer_models.py) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BUILD = ROOT / "build" / "benchmarks"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    name: str
    model: Path
    calib: Path
    test: Path
    limit: int
    extra: tuple[str, ...] = ()


def cases(shared: Path) -> list[Case]:
    models = BUILD / "models"
    return [
        Case("digits (built-in example)", ROOT / "examples/digits/model.onnx", ROOT / "examples/digits/calib", ROOT / "examples/digits/heldout", 400),
        Case("ResNet-56 / CIFAR-10", shared / "models/resnet56_cifar10.onnx", shared / "data/cifar10/train", shared / "data/cifar10/test", 3000),
        Case("ResNet-20 / CIFAR-10", shared / "models/resnet20_cifar10.onnx", shared / "data/cifar10/train", shared / "data/cifar10/test", 3000),
        Case("MobileNetV2 ImageNet -> CIFAR-10", models / "mobilenet_v2_cifar10.onnx", shared / "data/cifar10/train", shared / "data/cifar10/test", 3000),
        Case("MobileNetV2 ImageNet -> ants/bees", models / "mobilenet_v2_hymenoptera.onnx", shared / "data/hymenoptera/train", shared / "data/hymenoptera/val", 244),
    ]


def test_accuracy(model: Path, folder: Path) -> tuple[float, int]:
    from onnx_basisprune.calibration.data import InputSpec, load_calibration

    data = load_calibration(folder, InputSpec.from_model(onnx.load(str(model), load_external_data=False)))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    preds = [sess.run(None, batch)[0].argmax(1) for batch, _ in data.batches(256)]
    return float((np.concatenate(preds) == data.labels).mean()), len(data)


def run_case(case: Case, criterion: str, max_drop: float) -> dict:
    from onnx_basisprune.cli import main

    slug = "".join(c if c.isalnum() else "_" for c in case.name.lower()).strip("_")
    out = BUILD / f"{slug}.{criterion}.pruned.onnx"
    report = out.with_suffix(".json")
    argv = [str(case.model), "--calib", str(case.calib), "--limit", str(case.limit), "--max-drop", str(max_drop),
            "--criterion", criterion, "-o", str(out), "--report", str(report), *case.extra]
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        return {"case": case.name, "criterion": criterion, "error": f"exit code {code}"}
    data = json.loads(report.read_text())
    acc_before, n = test_accuracy(case.model, case.test)
    acc_after, _ = test_accuracy(out, case.test)
    return {
        "case": case.name,
        "criterion": criterion,
        "command": "onnx-basisprune " + " ".join(argv),
        "params": [data["original"]["params"], data["pruned"]["params"]],
        "macs": [data["original"]["macs"], data["pruned"]["macs"]],
        "file_bytes": [case.model.stat().st_size, out.stat().st_size],
        "heldout_quality": data["quality"],
        "test_accuracy": [acc_before, acc_after],
        "test_n": n,
        "latency": data.get("latency", {}),
        "calibration_seconds": data["calibration"]["seconds"],
        "total_seconds": round(seconds, 1),
    }


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| case | criterion | params kept | MACs kept | test acc. before → after (n) | CPU latency ratio b1 / b8 | calibration s | total s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['case']} | {r.get('criterion', '')} | {r.get('error') or r.get('skipped')} | | | | | |")
            continue
        cpu = {c["batch"]: c["ratio"] for c in r["latency"].get("cpu", [])}
        lat = " / ".join(f"{cpu[b]:.3f}" if b in cpu else "-" for b in (1, 8))
        lines.append(
            f"| {r['case']} | {r['criterion']} | {r['params'][1] / r['params'][0]:.3f} | {r['macs'][1] / r['macs'][0]:.3f} | "
            f"{r['test_accuracy'][0]:.4f} → {r['test_accuracy'][1]:.4f} ({r['test_n']}) | {lat} | {r['calibration_seconds']:.0f} | {r['total_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="comma-separated substrings of case names (default: all)")
    parser.add_argument("--criteria", default="energy", help="comma-separated criteria to compare (default energy)")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    wanted = [w.strip().lower() for w in args.cases.split(",")] if args.cases else None
    rows = []
    for case in cases(args.shared):
        if wanted and not any(w in case.name.lower() for w in wanted):
            continue
        if not case.model.exists() or not case.calib.exists():
            rows.append({"case": case.name, "skipped": f"absent: {case.model if not case.model.exists() else case.calib}"})
            continue
        for criterion in args.criteria.split(","):
            print(f"\n=== {case.name} ({criterion}) ===", flush=True)
            rows.append(run_case(case, criterion, args.max_drop))
    meta = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
            "python": sys.version.split()[0], "onnxruntime": ort.__version__, "max_drop": args.max_drop}
    (RESULTS / "calibrated_pruning.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    header = (f"## Main job: calibrated basis pruning, ≤ {args.max_drop:g} point drop\n\n"
              f"{meta['date']}, {meta['machine']}, onnxruntime {meta['onnxruntime']}. "
              "Written by `benchmarks/calibrated_pruning.py`. Search on a held-out 30 % of the calibration images; "
              "accuracy on the separate test images.")
    print("\n" + markdown(rows, header))
    (RESULTS / "calibrated_pruning.md").write_text(markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
