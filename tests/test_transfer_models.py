"""benchmarks/transfer_models.py, the ResNet-56 -> Fashion-MNIST model, on a handful of images:
the image folders written from the idx files (class folders, PNG pixels = idx pixels, kept when
complete, rewritten when not), the training preprocessing against the tool's own loader, and one
tiny end-to-end build (1 epoch of 20 images) with its ONNX, state_dict and JSON record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import ROOT, run

torch = pytest.importorskip("torch")
sys.path.insert(0, str(ROOT / "benchmarks"))
import transfer_models as T  # noqa: E402

from onnx_basisprune.calibration.data import InputSpec, Preprocess, load_calibration  # noqa: E402

TRAIN_PER_CLASS = 2
TEST_PER_CLASS = 1


@pytest.fixture(scope="module")
def shared(shared_dir: Path) -> Path:
    missing = [p for p in T.required_assets("fashion-mnist", shared_dir) if not p.is_file()]
    if missing:
        pytest.skip(f"not present: {', '.join(map(str, missing))}")
    return shared_dir


@pytest.fixture(scope="module")
def tiny(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with 2 train + 1 test image per class, written by the script."""
    root = tmp_path_factory.mktemp("data")
    mp = pytest.MonkeyPatch()
    mp.setattr(T, "FASHION_PER_CLASS", {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS})
    try:
        T.write_fashion_mnist(shared, root)
    finally:
        mp.undo()
    return root


@pytest.fixture
def restore_torch():
    """build() sets Torch's threads and deterministic mode process-wide: put them back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_idx_files(shared: Path) -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = T.fashion_split(shared, split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and np.bincount(labels).tolist() == [n // 10] * 10


def test_selection_is_first_per_class_in_file_order(shared: Path) -> None:
    _, labels = T.fashion_split(shared, "train")
    chosen = T.fashion_selection(labels, 1000)
    assert len(chosen) == 10000 and np.all(np.diff(chosen) > 0)
    assert np.bincount(labels[chosen]).tolist() == [1000] * 10
    for c in range(10):
        assert chosen[labels[chosen] == c].tolist() == np.flatnonzero(labels == c)[:1000].tolist()
    assert T.fashion_selection(labels, None).tolist() == list(range(60000))


def test_folders_hold_the_idx_pixels(shared: Path, tiny: Path) -> None:
    assert sorted(T.FASHION_CLASSES) == list(T.FASHION_CLASSES)  # sorted names = class-index order
    assert all(name.startswith(f"{i}_") for i, name in enumerate(T.FASHION_CLASSES))
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images, labels = T.fashion_split(shared, split)
        split_dir = tiny / "fashion-mnist" / split
        assert [p.name for p in sorted(split_dir.iterdir())] == list(T.FASHION_CLASSES)  # no leftovers
        files, file_labels, classes = T.image_files(split_dir)
        assert classes == list(T.FASHION_CLASSES)
        assert np.bincount(file_labels).tolist() == [per_class] * 10
        indices = [int(f.stem) for f in files]
        assert sorted(indices) == T.fashion_selection(labels, per_class).tolist()
        for f, label, index in zip(files, file_labels, indices):
            assert f.name == T.fashion_file(index) and f.parent.name == T.FASHION_CLASSES[label]
            assert labels[index] == label
            with Image.open(f) as img:
                assert img.format == "PNG" and img.mode == "L" and img.size == (28, 28)
                assert np.array_equal(np.asarray(img), images[index])


def test_complete_split_is_kept_incomplete_rewritten(shared: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "FASHION_PER_CLASS", {"train": 1, "test": 1})
    T.write_fashion_mnist(shared, tmp_path)
    split = tmp_path / "fashion-mnist" / "train"
    first = sorted((split / T.FASHION_CLASSES[3]).iterdir())[0]
    stamp = first.stat().st_mtime_ns
    T.write_fashion_mnist(shared, tmp_path)  # complete: not rewritten
    assert first.stat().st_mtime_ns == stamp
    sorted((split / T.FASHION_CLASSES[5]).iterdir())[0].unlink()  # incomplete: rewritten
    (split / T.FASHION_CLASSES[0] / "stray.png").write_bytes(b"")
    T.write_fashion_mnist(shared, tmp_path)
    files, labels, _ = T.image_files(split)
    assert np.bincount(labels).tolist() == [1] * 10 and all(f.stem.isdigit() for f in files)
    assert not list((tmp_path / "fashion-mnist").glob(".*"))  # no temporary folder left
    (split / "notes.txt").write_text("not ours")  # a folder the script did not write is not removed
    with pytest.raises(SystemExit, match="something other than"):
        T.write_fashion_mnist(shared, tmp_path)


def test_training_preprocessing_equals_the_tool_loader(shared: Path, tiny: Path) -> None:
    recipe = T.FASHION_MNIST
    spec = InputSpec.from_model(onnx.load(str(shared / T.RESNET56)))[0]
    assert (spec.channels, spec.height, spec.width) == (3, recipe.resolution, recipe.resolution)
    assert Preprocess.default_for(spec) == T.expected_preprocess(recipe)
    for split in ("train", "test"):
        folder = tiny / "fashion-mnist" / split
        files, labels, _ = T.image_files(folder)
        trained = T.normalise(T.load_upscaled(files, recipe.resolution)).numpy()
        data = load_calibration(folder, [spec])
        assert data.labels.tolist() == labels
        loaded = data.inputs[spec.name]
        assert loaded.shape == trained.shape == (len(files), 3, 32, 32)
        assert float(np.abs(loaded - trained).max()) <= 1e-6
        # and that is the grey value, resized, copied to 3 channels, with per-channel mean/std
        with Image.open(files[0]) as img:
            grey = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 255
        expected = (grey[None] - np.array(T.MEAN, np.float32)[:, None, None]) / np.array(T.STD, np.float32)[:, None, None]
        assert float(np.abs(loaded[0] - expected).max()) <= 1e-5


def test_tiny_build(shared: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    restore_torch) -> None:
    """main(--only fashion-mnist) with 1 epoch of 20 images: ONNX (opset 17, dynamic batch) that
    agrees with the state_dict and with baselines.cifar_resnet_from_onnx, and the JSON record."""
    import baselines as B

    recipe = T.Recipe(**{**T.asdict(T.FASHION_MNIST), "epochs": 1, "batch_size": 5})
    monkeypatch.setitem(T.RECIPES, "fashion-mnist", recipe)
    monkeypatch.setattr(T, "FASHION_PER_CLASS", {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS})
    out = tmp_path / "models"
    argv = ["--only", "fashion-mnist", "--shared", str(shared), "--out", str(out), "--data", str(tiny)]
    assert T.main(argv) == 0
    path = out / "resnet56_fashion_mnist.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert not any(n.op_type == "Gather" for n in model.graph.node)  # option-A shortcut as Slice + Pad
    assert not (out / "resnet56_fashion_mnist.pth").exists()  # would be read as a MobileNetV2 by baselines

    net = B.CifarResNet(9, (16, 32, 64), 10)
    net.load_state_dict(torch.load(out / "resnet56_fashion_mnist.state_dict.pth", weights_only=True))
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (logits,) = run(path, {"input": x})
    with torch.no_grad():
        assert np.abs(net.eval()(torch.from_numpy(x)).numpy() - logits).max() < 1e-4
        assert np.abs(B.cifar_resnet_from_onnx(path)(torch.from_numpy(x)).numpy() - logits).max() < 1e-4

    entry = json.loads((out / T.JSON_NAME).read_text())["resnet56_fashion_mnist"]
    assert entry["recipe"]["epochs"] == 1 and entry["recipe"]["trainable"].startswith("all layers")
    assert entry["train_images"] == 10 * TRAIN_PER_CLASS and entry["classes"] == list(T.FASHION_CLASSES)
    assert entry["base_model"]["max_rel_error_vs_onnxruntime"] <= 1e-4
    test = entry["test"]
    assert test["images"] == 10 * TEST_PER_CLASS and 0 <= test["accuracy"] <= 1
    assert test["max_abs_logit_diff_torch_vs_onnx"] < 1e-3
    assert entry["rebuild_check"]["max_abs_logit_diff_rebuilt_vs_trained"] < 1e-4
    assert entry["data"]["train"]["images"] == 10 * TRAIN_PER_CLASS
    assert f"--calib {tiny / 'fashion-mnist' / 'train'}" in entry["prune_command"]

    assert T.main(argv) == 0  # built: skipped, record kept
    assert json.loads((out / T.JSON_NAME).read_text())["resnet56_fashion_mnist"]["sha256"] == entry["sha256"]
