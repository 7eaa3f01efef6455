"""The built-in example under examples/digits/ (used by `make demo`) is present and sound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"
MODEL = DIGITS / "model.onnx"
CLASSES = [str(c) for c in range(10)]


def _load_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load PNGs as a user would: sorted class folders, PIL grey, /255."""
    xs, ys = [], []
    for label, cls in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        for f in sorted((root / cls).glob("*.png")):
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
            ys.append(label)
    return np.stack(xs)[:, None], np.asarray(ys)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    assert MODEL.is_file(), f"missing {MODEL}"
    return onnx.load(str(MODEL))


def test_model_is_valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert MODEL.stat().st_size < 2_000_000


def test_model_io(model: onnx.ModelProto) -> None:
    (inp,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert inp.name == "input"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert len(dims) == 4
    assert not dims[0].HasField("dim_value"), "batch dimension should be dynamic"
    assert [d.dim_value for d in dims[1:]] == [1, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits"]
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" in ops


def test_calib_folders() -> None:
    calib = DIGITS / "calib"
    folders = sorted(p.name for p in calib.iterdir() if p.is_dir())
    assert folders == CLASSES
    for cls in folders:
        pngs = list((calib / cls).glob("*.png"))
        assert len(pngs) > 0, f"calib/{cls} is empty"
    with Image.open(next((calib / "0").glob("*.png"))) as im:
        assert im.size == (32, 32) and im.mode == "L"


def test_heldout_accuracy() -> None:
    heldout = DIGITS / "heldout"
    assert sorted(p.name for p in heldout.iterdir() if p.is_dir()) == CLASSES
    x, y = _load_folder(heldout)
    assert x.shape[1:] == (1, 32, 32) and len(y) >= 500
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + 128]})[0] for i in range(0, len(x), 128)])
    assert logits.shape == (len(y), 10)
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.95, f"onnxruntime accuracy on heldout/ is {acc:.4f}"
