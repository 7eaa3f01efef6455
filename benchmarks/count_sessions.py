"""How many onnxruntime sessions one run of the tool opens, and its wall time.

    .venv/bin/python benchmarks/count_sessions.py MODEL.onnx --calib DATA [any onnx-basisprune option ...]

Runs the command line in this process with ``onnxruntime.InferenceSession`` wrapped by a counter,
then prints the sessions opened, the models serialised to bytes for them, and the seconds taken.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import onnxruntime as ort


def main(argv: Sequence[str] | None = None) -> int:
    from onnx_basisprune.cli import main as cli_main

    opened = 0
    original = ort.InferenceSession

    class Counted(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            nonlocal opened
            opened += 1
            super().__init__(*args, **kwargs)

    ort.InferenceSession = Counted
    start = time.perf_counter()
    try:
        code = cli_main(list(sys.argv[1:] if argv is None else argv))
    finally:
        ort.InferenceSession = original
    print(f"onnxruntime sessions opened: {opened}; wall time {time.perf_counter() - start:.0f} s; exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
