"""Written models are valid and equal: old-opset models (the onnx wheel's "light" models, IR 3,
opset 9), models with symbolic height/width (exported from Torch here; YOLOv8n and PaddleOCR
from PyPI wheels when they can be downloaded), and a failing check that writes nothing and says
why on one line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import assert_same_outputs, low_rank_weight, make_model, run, session, tensor
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnx_basisprune import BasisPruneError, decompose, prepare, prune
from onnx_basisprune.plan import ranks
from onnx_basisprune.basis import rewrite
from onnx_basisprune.plan.plans import budget_plan, data_free_plan
from onnx_basisprune.pipeline.prepared import apply_plan, plan_cost
from onnx_basisprune.cli import main

PREFIX = "onnx-basisprune: error:"
LIGHT = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet", "vgg19",
         "zfnet512")
BIG_FC = ("bvlc_alexnet", "vgg19", "zfnet512")  # 4096-wide fully connected layers: minutes of SVD each
LIGHT_DIR = "onnx/backend/test/data/light"


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(code: int, err: str, expect: str) -> str:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert expect in lines[0], err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Old opsets: the onnx wheel's light models


@pytest.fixture(scope="session")
def light_dir(tmp_path_factory) -> Path:
    """The light models of the installed onnx package, else of a downloaded onnx wheel."""
    installed = Path(onnx.__file__).parent.parent / LIGHT_DIR
    if any(installed.glob("light_*.onnx")):
        return installed
    tmp = tmp_path_factory.mktemp("onnx-wheel")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "onnx", "--no-deps", "--only-binary", ":all:", "-d",
                        str(tmp)], check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("the onnx light models are not installed and the onnx wheel could not be downloaded")
    wheel = next(tmp.glob("onnx-*.whl"), None)
    if wheel is None:
        pytest.skip("pip download gave no onnx wheel")
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith(LIGHT_DIR) and m.endswith(".onnx")]
        archive.extractall(tmp, members)
    if not members:
        pytest.skip(f"{wheel.name} holds no light models")
    return tmp / LIGHT_DIR


def _random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The light models' weights are ConstantOfShape fills of one value (every weight matrix of
    rank 1, every class score equal): make each an initializer of values around that fill, so
    that a wrong split changes the outputs. Initializers stay graph inputs too (IR 3)."""
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            nodes.append(node)
            continue
        fill = float(numpy_helper.to_array(node.attribute[0].t).ravel()[0])
        values = (fill * rng.uniform(0.5, 1.5, shapes[node.input[0]])).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
        model.graph.input.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, values.shape))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG_FC else n for n in LIGHT])
def test_light_models_are_written_valid_and_equal(light_dir, tmp_path, name):
    source = light_dir / f"light_{name}.onnx"
    if not source.is_file():
        pytest.skip(f"{source} not present")
    original = onnx.load(str(source))
    assert original.ir_version == 3 and original.opset_import[0].version < 11
    path = tmp_path / "model.onnx"
    onnx.save(_random_weights(original), str(path))
    prepared = prepare(path)  # one SVD pass for both plans
    full = apply_plan(prepared, ranks.full_rank_plan(prepared.layers))
    assert any(r.action == "decomposed" for r in full.layers)
    full.reference = ir.load(path)
    full.save(tmp_path / "full.onnx")  # verified against the original before it is written
    onnx.checker.check_model(str(tmp_path / "full.onnx"), full_check=True)
    assert_same_outputs(path, tmp_path / "full.onnx", batch=1)
    energy = apply_plan(prepared, data_free_plan(prepared, energy=0.99))
    energy.save(tmp_path / "energy.onnx")
    onnx.checker.check_model(str(tmp_path / "energy.onnx"), full_check=True)
    session(tmp_path / "energy.onnx")


# ---------------------------------------------------------------------------------------------
# Old opsets: Gemm without C


def _mlp(opset: int) -> onnx.ModelProto:
    """Two Gemms large enough to split, IR 3 (initializers listed as inputs), at ``opset``."""
    rng = np.random.default_rng(opset)
    legacy = {"broadcast": 1} if opset < 7 else {}
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="fc1", transB=1, **legacy),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], name="fc2", alpha=0.5, beta=2.0, **legacy)]
    inits = [tensor("W1", rng.standard_normal((256, 192)).astype(np.float32)), tensor("B1", rng.standard_normal(256).astype(np.float32)),
             tensor("W2", rng.standard_normal((256, 160)).astype(np.float32)), tensor("B2", rng.standard_normal(160).astype(np.float32))]
    return make_model(nodes, [("x", TensorProto.FLOAT, [3, 192])], [("y", TensorProto.FLOAT, [3, 160])], inits,
                      opset=opset, ir_version=3, initializers_as_inputs=True)


@pytest.mark.parametrize("opset", [7, 9, 10, 11, 13])
def test_gemm_split_at_old_opsets_is_valid_and_exact(tmp_path, opset):
    model = _mlp(opset)
    result = decompose(model)
    result.save(tmp_path / "out.onnx")
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    gemms = [n for n in out.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 4
    basis_inputs = {len(n.input) for n in gemms if n.name.endswith(".basis")}
    assert basis_inputs == ({3} if opset < 11 else {2})  # a zero C only where C is required
    assert_same_outputs(model, out)
    prune(model, energy=0.8).save(tmp_path / "pruned.onnx")


def test_gemm_split_before_opset_7_broadcasts_c():
    """onnxruntime runs no Gemm before opset 7; the split is still valid ONNX, and the reference
    implementation computes the same outputs."""
    from onnx.reference import ReferenceEvaluator

    model = _mlp(6)
    out = decompose(model).to_proto()
    onnx.checker.check_model(out, full_check=True)
    assert all({a.name: a.i for a in n.attribute}.get("broadcast") == 1 for n in out.graph.node if n.op_type == "Gemm")
    x = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
    want, = ReferenceEvaluator(model).run(None, {"x": x})
    got, = ReferenceEvaluator(out).run(None, {"x": x})
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# ---------------------------------------------------------------------------------------------
# A failed check: one line, nothing written


def test_a_model_failing_the_checker_is_not_written(tmp_path, capsys, caplog, monkeypatch):
    path = tmp_path / "in" / "mlp.onnx"
    path.parent.mkdir()
    onnx.save(_mlp(9), str(path))
    monkeypatch.setattr(rewrite, "_gemm_c", lambda graph, c, *args: [] if c is None else [c])  # the old bug
    code, out, err = _cli(capsys, path, "--full-rank", "--no-bench", "-o", tmp_path / "out.onnx")
    line = _one_error_line(code, err, "nothing written")
    assert "fc1.basis" in line or "fc2.basis" in line, line  # names the node
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "no logged tracebacks either"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlp.onnx"]


def test_an_inexact_full_rank_split_is_not_written(tmp_path):
    result = decompose(_mlp(13))
    weight = result.model.graph.initializers["fc1.scaling.weight"]
    weight.const_value = ir.tensor(weight.const_value.numpy() * 1.01, name=weight.name)
    with pytest.raises(BasisPruneError, match="differs from the original") as info:
        result.save(tmp_path / "out.onnx")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no model, no temporary folder


# ---------------------------------------------------------------------------------------------
# Symbolic height and width


class _SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 96, 1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def symbolic_model(tmp_path_factory) -> Path:
    """A small CNN exported from Torch with symbolic batch, height and width."""
    torch.manual_seed(0)
    net = _SmallNet().eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():  # decaying spectra, so that energy pruning has something to drop
        for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):
            w = conv.weight
            w.copy_(torch.from_numpy(low_rank_weight(rng, w.shape[0], w[0].numel(), decay=4.0)).reshape(w.shape))
    path = tmp_path_factory.mktemp("symbolic") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}})
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    return path


def _feeds(height: int, width: int, batch: int = 2) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(height * width).standard_normal((batch, 3, height, width)).astype(np.float32)}


def test_full_rank_split_without_input_size(symbolic_model, tmp_path):
    result = decompose(symbolic_model)
    assert result.original.macs is None and result.pruned.macs is None
    assert {r.action for r in result.layers if r.op == "Conv"} == {"decomposed"}
    result.save(tmp_path / "full.onnx")
    for height, width in ((32, 32), (48, 40), (17, 23)):  # the split holds at any size
        assert_same_outputs(symbolic_model, tmp_path / "full.onnx", feeds=_feeds(height, width))


def test_energy_and_params_targets_without_input_size(symbolic_model, tmp_path):
    result = prune(symbolic_model, energy=0.9)
    assert result.pruned.macs is None and result.pruned.params < result.original.params
    convs = [r for r in result.layers if r.op == "Conv"]
    assert all(r.macs is None for r in convs)
    assert any(r.action == "decomposed" for r in convs)
    assert all("break-even by weights" in r.reason for r in convs if r.action in ("decomposed", "recomposed"))
    result.save(tmp_path / "energy.onnx")
    run(tmp_path / "energy.onnx", _feeds(40, 24))
    by_params = prune(symbolic_model, target_params=0.6)
    assert by_params.pruned.params <= 0.6 * by_params.original.params
    by_params.save(tmp_path / "params.onnx")


def test_macs_target_asks_for_the_input_size(symbolic_model):
    with pytest.raises(BasisPruneError, match="--input-shape image=1x3x224x224"):
        prune(symbolic_model, target_macs=0.5)
    sized = prune(symbolic_model, target_macs=0.7, input_shapes={"image": (1, 3, 32, 32)})
    assert 0 < sized.pruned.macs <= 0.7 * sized.original.macs


def test_cli_on_symbolic_input_size(symbolic_model, tmp_path, capsys):
    out, report = tmp_path / "net.pruned.onnx", tmp_path / "r.json"
    code, stdout, err = _cli(capsys, symbolic_model, "--energy", "0.9", "-o", out, "--report", report)
    assert code == 0, err
    assert "MACs and latency not measured: input 'image' has a symbolic size" in stdout
    assert "unknown" in stdout
    data = json.loads(report.read_text())
    assert data["original"]["macs"] is None and data["pruned"]["macs"] is None and "latency" not in data
    run(out, _feeds(32, 48))
    code, stdout, err = _cli(capsys, "inspect", symbolic_model)
    assert code == 0, err
    code, _, err = _cli(capsys, symbolic_model, "--target-macs", "0.5", "-o", tmp_path / "m.onnx")
    _one_error_line(code, err, "--input-shape")
    assert not (tmp_path / "m.onnx").exists()


def test_a_size_learned_later_gives_positions_and_macs(symbolic_model):
    """What the calibrated run does with the size of its data (``Prepared.with_input_shapes``)."""
    unsized = prepare(symbolic_model)
    assert unsized.original.macs is None
    prepared = unsized.with_input_shapes({"image": (1, 3, 24, 24)})
    assert not any(layer.positions_known for layer in unsized.layers.values() if layer.op == "Conv")  # unchanged
    convs = [layer for layer in prepared.layers.values() if layer.op == "Conv"]
    assert prepared.original.macs == prepare(symbolic_model, {"image": (1, 3, 24, 24)}).original.macs > 0
    assert [layer.positions for layer in convs] == [24 * 24, 12 * 12, 12 * 12, 12 * 12]
    scores = {name: ranks.energy_scores(layer) for name, layer in prepared.splittable().items()}
    plan = budget_plan(prepared, scores, target_params=None, target_macs=0.8, block=8)
    assert plan_cost(prepared, plan)[1] <= 0.8 * prepared.original.macs


# Real models with symbolic sizes, from PyPI wheels (downloaded; skipped when that fails)
REAL = {
    "yolov8n": ("nudenet", "nudenet/320n.onnx"),
    "ppocr-det": ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr-cls": ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
}


@pytest.fixture(scope="session")
def wheel_models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    packages = sorted({package for package, _ in REAL.values()})
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", *packages, "--no-deps", "-d", str(folder)],
                       check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"could not download {', '.join(packages)}")
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(folder, [m for m in archive.namelist() if m.endswith(".onnx")])
    return folder


@pytest.mark.parametrize("case", list(REAL))
def test_real_models_with_symbolic_size(wheel_models, tmp_path, case):
    source = wheel_models / REAL[case][1]
    if not source.is_file():
        pytest.skip(f"{REAL[case][1]} is not in the downloaded wheel")
    full = decompose(source)
    assert full.original.macs is None
    full.save(tmp_path / "full.onnx")  # verified against the original at 64x64
    name = session(source).get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 160)).astype(np.float32)
    for want, got in zip(run(source, {name: x}), run(tmp_path / "full.onnx", {name: x})):
        assert np.abs(got - want).max() <= 1e-3 * max(np.abs(want).max(), 1.0)
    prune(source, energy=0.95).save(tmp_path / "energy.onnx")


def test_calibration_on_symbolic_input_size(symbolic_model, tmp_path, capsys):
    """--calib with a model of symbolic height/width: arrays carry their size; an image folder
    needs it (--input-shape or --crop) and says so in one line; with it the main job runs and its
    MACs are counted at the data's size."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(24):
        (folder / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / str(i % 2) / f"{i}.png")
    out = tmp_path / "net.pruned.onnx"
    code, _, err = _cli(capsys, symbolic_model, "--calib", folder, "--target-params", "0.7", "-o", out)
    assert code == 2 and "symbolic height/width" in err and "--input-shape image=1x3xHxW" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, stdout, err = _cli(capsys, symbolic_model, "--calib", folder, "--input-shape", "image=1x3x32x32",
                             "--target-params", "0.7", "--unlabeled", "--no-bench", "-o", out)
    assert code == 0, err
    assert "centre-crop 32x32" in stdout or "resize to 32x32" in stdout
    x = rng.standard_normal((24, 3, 28, 28)).astype(np.float32)
    result = prune(symbolic_model, calib={"image": x}, target_params=0.7, progress=False)
    assert result.pruned.params <= 0.7 * result.original.params and result.original.macs > 0
