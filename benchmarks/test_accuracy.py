"""Test accuracy of ONNX models on an image folder never used for pruning, with onnxruntime and
the tool's own loader (what benchmarks/run_benchmarks.py measures per row, for one-off checks).

    .venv/bin/python benchmarks/test_accuracy.py TEST_DIR MODEL.onnx [MODEL.onnx ...] [--limit N] [--seed S]

Prints one line per model: accuracy, images, and the change against the first model in points.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def predictions(model: Path, data, threads: int = 2) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feeds)[0].argmax(1) for feeds, _ in data.batches(250)])


def main(argv: Sequence[str] | None = None) -> int:
    from onnx_basisprune.calibration.data import InputSpec, load_calibration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("test", type=Path, help="image folder with class subfolders")
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--limit", type=int, help="a class-balanced random subset of this many images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    specs = InputSpec.from_model(onnx.load(str(args.models[0]), load_external_data=False))
    data = load_calibration(args.test, specs, limit=args.limit, seed=args.seed)
    first = None
    for model in args.models:
        accuracy = float((predictions(model, data) == data.labels).mean())
        first = accuracy if first is None else first
        print(f"{model}: {100 * accuracy:.2f} % of {len(data)} images ({100 * (accuracy - first):+.2f} pt)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
