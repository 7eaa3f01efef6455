"""Tests for onnx_basisprune.calibration.data: sources, preprocessing numbers, labels, split, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnx_basisprune.calibration.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CalibrationDataError,
    CalibrationSet,
    InputSpec,
    Preprocess,
    load_calibration,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


def spec(channels: int = 3, size: int | None = 32, layout: str = "NCHW", dtype=np.float32,
         name: str = "input") -> InputSpec:
    return InputSpec(name, layout, channels, size, size, np.dtype(dtype))


def save_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """A random image (smooth enough to survive JPEG) saved at ``path``; returns its pixels."""
    rng = np.random.default_rng(seed)
    bands = 1 if mode == "L" else 3
    small = rng.integers(0, 256, (max(height // 4, 1), max(width // 4, 1), bands), dtype=np.uint8)
    img = Image.fromarray(small.squeeze(-1) if bands == 1 else small, mode).resize((width, height))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return np.asarray(Image.open(path))


def class_folder(root: Path, counts: dict[str, int], size: int = 12, ext: str = ".png") -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            save_image(root / name / f"{i:03d}{ext}", size + i, size, seed=100 * c + i)
    return root


@contextlib.contextmanager
def one_line_error(match: str) -> Iterator[None]:
    """Expect a CalibrationDataError matching ``match``, with a one-line message."""
    with pytest.raises(CalibrationDataError, match=match) as err:
        yield
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- InputSpec


def _model(inputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [vi.name], [f"out_{vi.name}"]) for vi in inputs]
    outputs = [helper.make_tensor_value_info(f"out_{vi.name}", vi.type.tensor_type.elem_type, None)
               for vi in inputs]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)))


def test_input_spec_from_model_guesses_layout_and_skips_initializers() -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    model = _model([
        helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, 224, 224]),
        helper.make_tensor_value_info("hwc", TensorProto.UINT8, [1, 32, 32, 3]),
        helper.make_tensor_value_info("dyn", TensorProto.FLOAT16, ["n", 1, "h", "w"]),
        helper.make_tensor_value_info("vec", TensorProto.INT64, ["n", 10]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
    ], [weight])
    img, hwc, dyn, vec = InputSpec.from_model(model)
    assert img == InputSpec("img", "NCHW", 3, 224, 224, np.dtype(np.float32), (None, 3, 224, 224))
    assert (hwc.layout, hwc.channels, hwc.height, hwc.width, hwc.dtype) == ("NHWC", 3, 32, 32, np.uint8)
    assert (dyn.layout, dyn.channels, dyn.height, dyn.width, dyn.dtype) == ("NCHW", 1, None, None, np.float16)
    assert (vec.layout, vec.channels, vec.shape, vec.dtype) == ("other", None, (None, 10), np.int64)


# --------------------------------------------------------------------------- defaults


def test_default_preprocess_imagenet_size() -> None:
    pre = Preprocess.default_for(spec(3, 224))
    assert (pre.resize, pre.crop, pre.scale, pre.mean, pre.std, pre.bgr) == (
        256, (224, 224), 1 / 255, IMAGENET_MEAN, IMAGENET_STD, False)
    assert pre.describe() == ("resize short side 256, centre-crop 224x224, /255, "
                              "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), RGB")
    assert Preprocess.default_for(spec(3, 160)).resize == 183  # round(160 * 256 / 224)


def test_default_preprocess_small_grey_and_integer_inputs() -> None:
    cifar = Preprocess.default_for(spec(3, 32))
    assert (cifar.resize, cifar.crop, cifar.mean) == (None, (32, 32), IMAGENET_MEAN)
    grey = Preprocess.default_for(spec(1, 28))
    assert grey.describe() == "resize to 28x28, /255, mean (0), std (1), grey"
    raw = Preprocess.default_for(spec(3, 224, "NHWC", np.uint8))
    assert raw.describe() == "resize short side 256, centre-crop 224x224, /1, mean (0, 0, 0), std (1, 1, 1), RGB"
    bgr = dataclasses.replace(cifar, bgr=True, scale=0.3)
    assert bgr.describe().endswith("x0.3, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), BGR")


def test_symbolic_size_needs_crop(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", 40, 30)
    dynamic = spec(3, None)
    with one_line_error("symbolic height/width"):
        Preprocess.default_for(dynamic)
    with one_line_error("symbolic height/width"):
        load_calibration(tmp_path, [dynamic])
    pre = Preprocess(None, (20, 24), 1 / 255, IMAGENET_MEAN, IMAGENET_STD, False)
    assert load_calibration(tmp_path, [dynamic], pre).inputs["input"].shape == (1, 3, 20, 24)


# --------------------------------------------------------------------------- numbers


def test_default_preprocessing_matches_hand_computation(tmp_path: Path) -> None:
    pixels = save_image(tmp_path / "img.png", 300, 200)
    x = load_calibration(tmp_path, [spec(3, 224)]).inputs["input"]
    resized = np.asarray(Image.fromarray(pixels).resize((384, 256), Image.Resampling.BILINEAR))  # 256·300/200
    crop = resized[16:240, 80:304].astype(np.float32)  # centre 224x224 of 256x384
    expected = ((crop / 255 - MEAN) / STD).transpose(2, 0, 1)
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], expected, atol=1e-5)


def test_default_preprocessing_matches_torchvision(tmp_path: Path) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    sizes = [(300, 257), (257, 300), (224, 224), (640, 480)]
    for i, (w, h) in enumerate(sizes):
        save_image(tmp_path / f"{i}.jpg", w, h, seed=i)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = load_calibration(tmp_path, [spec(3, 224)]).inputs["input"]
    for i in range(len(sizes)):
        with Image.open(tmp_path / f"{i}.jpg") as img:
            expected = reference(img.convert("RGB")).numpy()
        np.testing.assert_allclose(x[i], expected, atol=1e-5)


def test_nhwc_float16_and_uint8_layouts(tmp_path: Path) -> None:
    pixels = save_image(tmp_path / "a.png", 16, 16)
    half = load_calibration(tmp_path, [spec(3, 16, "NHWC", np.float16)]).inputs["input"]
    assert half.shape == (1, 16, 16, 3) and half.dtype == np.float16
    np.testing.assert_allclose(half[0], (pixels / 255 - MEAN) / STD, atol=2e-3)
    raw = load_calibration(tmp_path, [spec(3, 16, "NHWC", np.uint8)]).inputs["input"]
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw[0], pixels)


def test_grey_model_reads_colour_and_grey_in_all_formats(tmp_path: Path) -> None:
    save_image(tmp_path / "a.PNG", 40, 30, "L")
    save_image(tmp_path / "b.jpeg", 28, 28)
    save_image(tmp_path / "c.BMP", 20, 50)
    save_image(tmp_path / "d.webp", 28, 28, "L")
    (tmp_path / "notes.txt").write_text("not an image")
    result = load_calibration(tmp_path, [spec(1, 28)])
    x = result.inputs["input"]
    assert x.shape == (4, 1, 28, 28) and result.labels is None and result.class_names is None
    assert 0 <= x.min() and x.max() <= 1
    with Image.open(tmp_path / "b.jpeg") as img:
        expected = np.asarray(img.convert("L").resize((28, 28), Image.Resampling.BILINEAR)) / 255
    np.testing.assert_allclose(x[1, 0], expected, atol=1e-6)


def test_colour_model_reads_grey_image_and_bgr(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", 8, 8, "L")
    x = load_calibration(tmp_path, [spec(3, 8)]).inputs["input"][0]
    grey = x * STD[:, None, None] + MEAN[:, None, None]
    np.testing.assert_allclose(grey[0], grey[1], atol=1e-5)
    save_image(tmp_path / "a.png", 8, 8, "RGB")
    rgb, bgr = (load_calibration(tmp_path, [spec(3, 8)], Preprocess(None, None, 1 / 255, (0,) * 3, (1,) * 3, flip))
                .inputs["input"][0] for flip in (False, True))
    np.testing.assert_array_equal(bgr, rgb[::-1])


# --------------------------------------------------------------------------- labels


def test_labels_from_sorted_class_folders(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", {"dog": 2, "cat": 3})
    (root / "empty").mkdir()
    (root / ".hidden").mkdir()
    save_image(root / "cat" / "nested" / "deep.JPG", 12, 12)
    result = load_calibration(root, [spec(3, 12)])
    assert result.class_names == ["cat", "dog", "empty"]
    assert result.labels.tolist() == [0, 0, 0, 0, 1, 1] and result.labels.dtype == np.int64
    assert len(result) == 6 and "6 of 6 images, 3 classes" in result.source


def test_labels_file_text_and_json(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", {"cat": 1, "dog": 2})
    text = tmp_path / "labels.txt"
    text.write_text("dog\ncat\n")
    result = load_calibration(root, [spec(3, 12)], labels_file=text)
    assert result.labels.tolist() == [1, 0, 0] and result.class_names == ["dog", "cat"]
    mapping = tmp_path / "labels.json"
    mapping.write_text(json.dumps({"cat": 3, "dog": 7}))
    result = load_calibration(root, [spec(3, 12)], labels_file=mapping, num_classes=10)
    assert result.labels.tolist() == [3, 7, 7] and result.class_names[3] == "cat"


# --------------------------------------------------------------------------- arrays


def test_npy_in_either_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nchw = rng.normal(size=(5, 3, 8, 8)).astype(np.float64)
    np.save(tmp_path / "nchw.npy", nchw)
    np.save(tmp_path / "nhwc.npy", nchw.transpose(0, 2, 3, 1))
    for name in ("nchw.npy", "nhwc.npy"):
        for layout, expected in (("NCHW", nchw), ("NHWC", nchw.transpose(0, 2, 3, 1))):
            x = load_calibration(tmp_path / name, [spec(3, 8, layout)]).inputs["input"]
            assert x.dtype == np.float32
            np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_npy_uint8_pixels_are_normalised(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    x = load_calibration(tmp_path / "x.npy", [spec(3, 8)]).inputs["input"]
    np.testing.assert_allclose(x, ((pixels / 255 - MEAN) / STD).transpose(0, 3, 1, 2), atol=1e-5)
    grey = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "g.npy", grey)
    g = load_calibration(tmp_path / "g.npy", [spec(1, 28)]).inputs["input"]
    np.testing.assert_allclose(g[:, 0], grey / 255, atol=1e-6)


@pytest.mark.parametrize("x_key, y_key", [("x", "y"), ("images", "labels")])
def test_npz_images_and_labels(tmp_path: Path, x_key: str, y_key: str) -> None:
    x = np.random.default_rng(0).normal(size=(6, 4, 4, 1)).astype(np.float32)
    np.savez(tmp_path / "d.npz", **{x_key: x, y_key: np.array([0, 1, 2, 0, 1, 2])})
    result = load_calibration(tmp_path / "d.npz", [spec(1, 4)], num_classes=3)
    assert result.inputs["input"].shape == (6, 1, 4, 4)
    assert result.labels.tolist() == [0, 1, 2, 0, 1, 2] and result.labels.dtype == np.int64


def test_npz_one_array_per_input(tmp_path: Path) -> None:
    specs = [spec(3, 4), InputSpec("ids", "other", None, None, None, np.dtype(np.int64), (None, 5))]
    np.savez(tmp_path / "d.npz", input=np.zeros((3, 3, 4, 4), np.float32),
             ids=np.arange(15, dtype=np.int32).reshape(3, 5))
    result = load_calibration(tmp_path / "d.npz", specs, limit=2)
    assert result.inputs["input"].shape == (2, 3, 4, 4) and result.labels is None
    assert result.inputs["ids"].dtype == np.int64 and result.inputs["ids"].shape == (2, 5)


# --------------------------------------------------------------------------- split, limit, batches


def labeled_set(counts: list[int]) -> CalibrationSet:
    labels = np.repeat(np.arange(len(counts)), counts)
    return CalibrationSet({"input": np.arange(len(labels), dtype=np.float32)[:, None]}, labels, None, "test")


def test_split_is_stratified_and_deterministic() -> None:
    data = labeled_set([30, 60, 90])
    rest, held = data.split(0.2, seed=3)
    assert np.bincount(held.labels).tolist() == [6, 12, 18] and len(rest) == 144
    ids = np.concatenate([rest.inputs["input"][:, 0], held.inputs["input"][:, 0]])
    assert sorted(ids.tolist()) == list(range(180))
    again = data.split(0.2, seed=3)[1]
    np.testing.assert_array_equal(again.inputs["input"], held.inputs["input"])
    other = data.split(0.2, seed=4)[1]
    assert not np.array_equal(other.inputs["input"], held.inputs["input"])
    unlabeled = CalibrationSet(data.inputs, None, None, "test")
    assert [len(p) for p in unlabeled.split(0.25, seed=0)] == [135, 45]


def test_limit_is_class_balanced_deterministic_and_decodes_only_chosen(tmp_path: Path, monkeypatch) -> None:
    from onnx_basisprune.calibration import data as module

    root = class_folder(tmp_path / "data", {"a": 2, "b": 6, "c": 6}, size=6)
    decoded: list[Path] = []
    read_image = module._read_image
    monkeypatch.setattr(module, "_read_image", lambda path, *a: decoded.append(path) or read_image(path, *a))
    result = load_calibration(root, [spec(3, 6)], limit=8, seed=1)
    assert len(decoded) == 1 and np.bincount(result.labels).tolist() == [2, 3, 3]  # the first, checked
    result.inputs
    chosen = set(decoded[1:])
    assert len(decoded) == 9 and len(chosen) == 8 and decoded[0] in chosen
    again = load_calibration(root, [spec(3, 6)], limit=8, seed=1)
    np.testing.assert_array_equal(again.inputs["input"], result.inputs["input"])
    assert "8 of 14 images" in result.source


def test_limit_on_labeled_arrays_and_batches(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((40, 2, 2, 3), np.uint8), y=np.repeat([0, 1, 2, 3], 10))
    result = load_calibration(tmp_path / "d.npz", [spec(3, 2)], limit=12)
    assert np.bincount(result.labels).tolist() == [3, 3, 3, 3]
    sizes = [(len(x["input"]), len(y)) for x, y in result.batches(5)]
    assert sizes == [(5, 5), (5, 5), (2, 2)]
    with one_line_error("limit must be at least 1"):
        load_calibration(tmp_path / "d.npz", [spec(3, 2)], limit=0)
    with one_line_error("leaves an empty part"):
        result.split(0.01, seed=0)
    with one_line_error("batch_size must be at least 1"):
        next(result.batches(0))


# --------------------------------------------------------------------------- bad input


def _corrupt(root: Path) -> Path:
    save_image(root / "good.png", 8, 8)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def _truncated(root: Path) -> Path:
    save_image(root / "t.jpg", 64, 64)
    data = (root / "t.jpg").read_bytes()
    (root / "t.jpg").write_bytes(data[: len(data) // 2])
    return root


def _empty(root: Path) -> Path:
    root.mkdir()
    return root


def _no_images(root: Path) -> Path:
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "readme.txt").write_text("x")
    return root


def _mixed(root: Path) -> Path:
    class_folder(root, {"a": 1})
    save_image(root / "top.png", 8, 8)
    return root


@pytest.mark.parametrize("build, message", [
    (lambda p: p / "missing", "not found"),
    (_empty, "empty"),
    (_no_images, r"no images \(.png"),
    (_corrupt, "cannot read image .*broken.png"),
    (_truncated, "cannot read image .*t.jpg"),
    (_mixed, "both images and class subfolders"),
])
def test_bad_folders(tmp_path: Path, build, message: str) -> None:
    with one_line_error(message):
        load_calibration(build(tmp_path / "data"), [spec(3, 8)])


@pytest.mark.parametrize("array, expected", [
    (np.zeros((4, 3, 8), np.float32), r"expected \(N, 3, 8, 8\) or \(N, 8, 8, 3\).* got \(4, 3, 8\)"),
    (np.zeros((4, 3, 9, 9), np.float32), r"got \(4, 3, 9, 9\)"),
    (np.zeros((4, 8, 8, 2), np.float32), r"got \(4, 8, 8, 2\)"),
    (np.zeros((0, 3, 8, 8), np.float32), "holds no samples"),
    (np.zeros((4, 3, 8, 8), np.complex64), "float32-compatible data .* got complex64"),
    (np.full((4, 3, 8, 8), "a"), "float32-compatible data .* got <U1"),
])
def test_bad_npy(tmp_path: Path, array: np.ndarray, expected: str) -> None:
    np.save(tmp_path / "x.npy", array)
    with one_line_error(expected):
        load_calibration(tmp_path / "x.npy", [spec(3, 8)])


def test_bad_array_dtypes_and_shapes_for_non_image_inputs(tmp_path: Path) -> None:
    ids = InputSpec("ids", "other", None, None, None, np.dtype(np.int64), (None, 5))
    np.save(tmp_path / "f.npy", np.zeros((2, 5), np.float32))
    with one_line_error("expected int64-compatible data for input 'ids', got float32"):
        load_calibration(tmp_path / "f.npy", [ids])
    np.save(tmp_path / "s.npy", np.zeros((2, 6), np.int64))
    with one_line_error(r"expected shape \(N, 5\) for input 'ids', got \(2, 6\)"):
        load_calibration(tmp_path / "s.npy", [ids])
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with one_line_error("cannot read .*bad.npy"):
        load_calibration(tmp_path / "bad.npy", [ids])


@pytest.mark.parametrize("arrays, num_classes, expected", [
    ({"x": np.zeros((3, 3, 4, 4)), "y": np.array([0, -1, 1])}, None, "negative label -1"),
    ({"x": np.zeros((3, 3, 4, 4)), "y": np.array([0, 1, 5])}, 5, "label 5 is out of range for 5 classes"),
    ({"x": np.zeros((3, 3, 4, 4)), "y": np.array([0.0, 1.0, 2.0])}, None, "expected integer labels"),
    ({"x": np.zeros((3, 3, 4, 4)), "y": np.array([0, 1])}, None, r"labels of shape \(3,\)"),
    ({"pixels": np.zeros((3, 3, 4, 4))}, None, "needs an array named x or images.*found: pixels"),
    ({"x": np.zeros((3, 3, 4, 4)), "images": np.zeros((3, 3, 4, 4))}, None, "both 'x' and 'images'"),
])
def test_bad_npz(tmp_path: Path, arrays: dict, num_classes: int | None, expected: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with one_line_error(expected):
        load_calibration(tmp_path / "d.npz", [spec(3, 4)], num_classes=num_classes)


def test_bad_labels_and_specs(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", {"cat": 1, "dog": 1, "fox": 1}, size=8)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nfox\nwolf\n")
    with one_line_error("names folders that do not exist: wolf"):
        load_calibration(root, [spec(3, 8)], labels_file=labels)
    labels.write_text("cat\ndog\n")
    with one_line_error("does not name folders: fox"):
        load_calibration(root, [spec(3, 8)], labels_file=labels)
    labels.write_text('{"cat": 0, "dog": -2, "fox": 1}')
    with one_line_error("'dog' maps to -2"):
        load_calibration(root, [spec(3, 8)], labels_file=labels)
    with one_line_error("label 2 is out of range for 2 classes"):
        load_calibration(root, [spec(3, 8)], num_classes=2)
    with one_line_error("feeds one input but the model has 2"):
        load_calibration(root, [spec(3, 8), spec(3, 8, name="other")])
    with one_line_error("'vec' is not an image input"):
        load_calibration(root, [InputSpec("vec", "other", None, None, None, np.dtype(np.float32), (None, 4))])
    with one_line_error("does not match input 'input' size"):
        load_calibration(root, [spec(3, 8)], Preprocess(10, (6, 6), 1.0, (0,) * 3, (1,) * 3, False))
    with one_line_error("mean/std have 1 values but input 'input' has 3 channels"):
        load_calibration(root, [spec(3, 8)], Preprocess(None, None, 1.0, (0,), (1,), False))
    (tmp_path / "x.csv").write_text("1,2")
    with one_line_error("expected an image folder, .npy or .npz"):
        load_calibration(tmp_path / "x.csv", [spec(3, 8)])


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED / "data/cifar10/test").is_dir(), reason="../shared/data/cifar10 not present")
def test_real_cifar10_test_folder() -> None:
    result = load_calibration(SHARED / "data/cifar10/test", [spec(3, 32)], limit=200, seed=0)
    x = result.inputs["input"]
    assert x.shape == (200, 3, 32, 32) and x.dtype == np.float32
    assert len(result.class_names) == 10 and result.class_names[0] == "airplane"
    assert np.bincount(result.labels, minlength=10).tolist() == [20] * 10
    assert -2.5 < x.min() < 0 < x.max() < 2.8


# --------------------------------------------------------------------------- laziness and memory


def _count_decodes(monkeypatch) -> list[Path]:
    """Record every image decoded by the module (all decoding goes through ``_read_image``)."""
    from onnx_basisprune.calibration import data as module

    decoded: list[Path] = []
    read_image = module._read_image
    monkeypatch.setattr(module, "_read_image", lambda path, *a: decoded.append(path) or read_image(path, *a))
    return decoded


def _reference(files: list[Path], size: int) -> np.ndarray:
    """The default CIFAR-size preprocessing done by hand, file by file: resize, /255, ImageNet mean/std, NCHW."""
    out = []
    for f in files:
        with Image.open(f) as img:
            pixels = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        out.append(((pixels.astype(np.float32) * np.float32(1 / 255) - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(out)


def test_image_folder_decodes_only_per_batch(tmp_path: Path, monkeypatch) -> None:
    root = class_folder(tmp_path / "data", {"a": 4, "b": 6}, size=10)
    decoded = _count_decodes(monkeypatch)
    result = load_calibration(root, [spec(3, 10)])
    assert len(decoded) <= 1
    decoded.clear()
    assert len(result) == 10 and result.labels.tolist() == [0] * 4 + [1] * 6 and result.class_names == ["a", "b"]
    rest, held = result.split(0.3, seed=0)
    part = rest.subset(np.array([0, 2]))
    assert (len(rest), len(held), len(part)) == (7, 3, 2) and decoded == []
    batches = result.batches(4)
    assert decoded == []
    steps = []
    for x, y in batches:
        steps.append(len(decoded))
        assert len(x["input"]) == len(y) == steps[-1]
        decoded.clear()
    assert steps == [4, 4, 2]


def test_batches_equal_eager_decoding(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", {"a": 3, "b": 4}, size=10)
    files = sorted(root.rglob("*.png"))
    result = load_calibration(root, [spec(3, 8)])
    expected = _reference(files, 8)
    streamed = [x["input"] for x, _ in result.batches(3)]
    assert [len(x) for x in streamed] == [3, 3, 1]
    assert all(x.dtype == np.float32 and x.flags.c_contiguous for x in streamed)
    np.testing.assert_allclose(np.concatenate(streamed), expected, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate(streamed), result.inputs["input"])  # one-shot path agrees
    rest, held = result.split(0.3, seed=1)
    order = np.concatenate([rest._index, held._index])  # positions in the folder's file list
    assert sorted(order.tolist()) == list(range(7))
    for part in (rest, held):
        got = np.concatenate([x["input"] for x, _ in part.batches(2)])
        np.testing.assert_allclose(got, expected[part._index], atol=1e-6)
        labels = np.concatenate([y for _, y in part.batches(2)])
        np.testing.assert_array_equal(labels, result.labels[part._index])
    again = np.concatenate([x["input"] for x, _ in load_calibration(root, [spec(3, 8)]).batches(5)])
    np.testing.assert_array_equal(again, np.concatenate(streamed))  # deterministic across loads and batch sizes


def test_npy_is_memory_mapped_and_read_per_batch(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    result = load_calibration(tmp_path / "x.npy", [spec(3, 6)], limit=6, seed=2)
    raw = result._samples.arrays[0][1]
    assert isinstance(raw, np.memmap) and raw.mode == "r"
    chosen = result._index
    assert len(chosen) == 6 and np.all(np.diff(chosen) > 0)
    writable = np.load(tmp_path / "x.npy", mmap_mode="r+")  # change the file after loading:
    writable[chosen[-1]] = 255  # the batches see it, so nothing was copied at load time
    writable.flush()
    del writable
    pixels[chosen[-1]] = 255
    batches = list(result.batches(4))
    assert [len(x["input"]) for x, _ in batches] == [4, 2] and all(y is None for _, y in batches)
    assert all(type(x["input"]) is np.ndarray for x, _ in batches)
    x = np.concatenate([x["input"] for x, _ in batches])
    np.testing.assert_allclose(x, ((pixels[chosen] / 255 - MEAN) / STD).transpose(0, 3, 1, 2), atol=1e-5)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_integer_range_is_checked_at_load(tmp_path: Path, suffix: str) -> None:
    ids = InputSpec("ids", "other", None, None, None, np.dtype(np.int32), (None, 2))
    data = np.zeros((50, 2), np.int64)
    data[37, 1] = 2**40
    if suffix == ".npy":
        np.save(tmp_path / "d.npy", data)
    else:
        np.savez(tmp_path / "d.npz", ids=data)
    with one_line_error(r"values \[0, 1099511627776\] do not fit int32"):
        load_calibration(tmp_path / f"d{suffix}", [ids])
    data[37, 1] = 7
    np.save(tmp_path / "d.npy", data)
    got = np.concatenate([x["ids"] for x, _ in load_calibration(tmp_path / "d.npy", [ids]).batches(8)])
    assert got.dtype == np.int32 and got.tolist() == data.tolist()


def test_corrupt_image_in_the_middle_fails_at_load(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    for i in range(6):
        save_image(root / f"{i}.png", 8, 8, seed=i)
    (root / "3.png").write_bytes(b"\x89PNG not really")
    decoded = _count_decodes(monkeypatch)
    with one_line_error(r"cannot read image .*3\.png"):
        load_calibration(root, [spec(3, 8)])
    assert len(decoded) == 0  # found by the header check, before any decoding
    data = bytearray((root / "2.png").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a damaged PNG chunk: its CRC no longer matches
    save_image(root / "3.png", 8, 8)
    (root / "2.png").write_bytes(bytes(data))
    with one_line_error(r"cannot read image .*2\.png"):
        load_calibration(root, [spec(3, 8)])


def test_truncated_jpeg_in_the_middle_fails_in_its_batch(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(6):
        save_image(root / f"{i}.jpg", 64, 64, seed=i)
    data = (root / "3.jpg").read_bytes()
    (root / "3.jpg").write_bytes(data[: len(data) // 2])  # headers intact: only decoding finds it
    result = load_calibration(root, [spec(3, 8)])
    batches = result.batches(2)
    next(batches)
    with one_line_error(r"cannot read image .*3\.jpg"):
        next(batches)
    with one_line_error("batch_size must be at least 1"):
        result.batches(0)  # checked at the call, not at the first batch


def test_arrays_in_memory_load_like_an_npz(tmp_path):
    """``prune(model, calib=arrays)``: one array for a single input, or arrays by name with labels."""
    one = spec(size=8, name="x")
    x = np.random.default_rng(0).random((20, 3, 8, 8), dtype=np.float32)
    y = np.arange(20) % 4
    single = load_calibration(x, [one], limit=10, seed=1)
    assert len(single) == 10 and single.labels is None
    named = load_calibration({"x": x, "labels": y}, [one], num_classes=4)
    np.savez(tmp_path / "d.npz", x=x, labels=y)
    stored = load_calibration(tmp_path / "d.npz", [one], num_classes=4)
    np.testing.assert_array_equal(named.labels, stored.labels)
    np.testing.assert_array_equal(named.inputs["x"], stored.inputs["x"])
    with pytest.raises(CalibrationDataError, match="labels"):
        load_calibration({"x": x, "labels": y.astype(np.float32)}, [one])
