"""The command line end to end (data-free paths), its entry points, and bad inputs one by one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    EXAMPLE_MODEL,
    ROOT,
    assert_same_outputs,
    cnn_model,
    initializer_params,
    make_model,
    random_feeds,
    run,
    shared_model,
    tensor,
)
from onnx import TensorProto, helper

from onnx_basisprune.cli import main

ACTIONS = {"decomposed", "recomposed", "kept", "skipped"}
PREFIX = "onnx-basisprune: error:"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def digits(tmp_path) -> Path:
    path = tmp_path / "digits.onnx"
    shutil.copy(EXAMPLE_MODEL, path)
    return path


def _check_report(report: dict) -> None:
    for key in ("original", "pruned"):
        assert set(report[key]) >= {"params", "macs"}
        assert all(isinstance(report[key][k], int) and report[key][k] > 0 for k in ("params", "macs"))
    assert report["layers"]
    for layer in report["layers"]:
        assert set(layer) >= {"name", "op", "full_rank", "kept_rank", "action", "reason"}
        assert layer["action"] in ACTIONS
        assert layer["op"] in ("Conv", "Gemm", "MatMul")
        assert isinstance(layer["name"], str) and layer["name"]
        assert isinstance(layer["reason"], str) and layer["reason"]
        if layer["action"] == "skipped":
            assert layer["kept_rank"] is None
        else:
            assert 1 <= layer["kept_rank"] <= layer["full_rank"]
        if layer["action"] == "kept":
            assert layer["kept_rank"] == layer["full_rank"]


# ---------------------------------------------------------------------------------------------
# End to end


def test_default_output_beside_the_input_and_input_unchanged(capsys, digits):
    before = digits.read_bytes()
    code, out, err = _cli(capsys, digits, "--energy", "0.9", "--no-bench")
    assert code == 0, err
    output = digits.with_name("digits.pruned.onnx")
    assert output.is_file()
    assert f"wrote {output}" in out
    assert digits.read_bytes() == before
    assert sorted(p.name for p in digits.parent.iterdir()) == ["digits.onnx", "digits.pruned.onnx"]
    model = onnx.load(str(output))
    onnx.checker.check_model(model, full_check=True)
    (logits,) = run(model, random_feeds(digits, batch=3))
    assert logits.shape == (3, 10)


def test_full_rank_is_exact(capsys, digits, tmp_path):
    out_path = tmp_path / "full.onnx"
    report_path = tmp_path / "full.json"
    code, out, err = _cli(capsys, digits, "--full-rank", "-o", out_path, "--report", report_path, "--no-bench")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    _check_report(report)
    assert {layer["action"] for layer in report["layers"]} <= {"decomposed", "skipped"}
    assert any(layer["action"] == "decomposed" for layer in report["layers"])
    assert all(layer["kept_rank"] == layer["full_rank"] for layer in report["layers"] if layer["action"] == "decomposed")
    for batch in (1, 4):
        assert_same_outputs(digits, out_path, batch=batch)


def test_energy_and_target_params_with_reports(capsys, digits, tmp_path):
    reports = {}
    for name, args in {"e90": ["--energy", "0.9"], "e50": ["--energy", "0.5"], "p60": ["--target-params", "0.6"],
                       "m60": ["--target-macs", "0.6"]}.items():
        out_path, report_path = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        code, out, err = _cli(capsys, digits, *args, "-o", out_path, "--report", report_path, "--no-bench")
        assert code == 0, (name, err)
        assert f"wrote {report_path}" in out
        report = json.loads(report_path.read_text())
        _check_report(report)
        assert report["pruned"]["params"] == initializer_params(onnx.load(str(out_path)))
        assert report["output"] == str(out_path)
        run(out_path, random_feeds(digits))
        reports[name] = report
    assert reports["e50"]["pruned"]["params"] <= reports["e90"]["pruned"]["params"] < reports["e90"]["original"]["params"]
    assert reports["p60"]["pruned"]["params"] <= 0.6 * reports["p60"]["original"]["params"]
    assert reports["m60"]["pruned"]["macs"] <= 0.6 * reports["m60"]["original"]["macs"]


def test_inspect(capsys, digits):
    before = _listing(digits.parent)
    code, out, err = _cli(capsys, "inspect", digits)
    assert code == 0, err
    assert "/features/features.3/Conv" in out
    assert "r@99%" in out and "break-even" in out
    assert "7 layers, 5 splittable" in out
    assert _listing(digits.parent) == before, "inspect writes nothing"


def test_input_shape_option(capsys, tmp_path):
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [("x", TensorProto.FLOAT, ["N", "T", 256])], [("y", TensorProto.FLOAT, ["N", "T", 200])],
                       [tensor("W", rng.standard_normal((256, 200)).astype(np.float32))])
    path = tmp_path / "seq.onnx"
    onnx.save(model, str(path))
    code, out, err = _cli(capsys, path, "--target-macs", "0.5", "--no-bench")  # MACs need the size
    assert code == 2 and err.startswith(PREFIX) and "--input-shape" in err
    assert not path.with_name("seq.pruned.onnx").exists()
    code, out, err = _cli(capsys, path, "--full-rank", "--no-bench", "--input-shape", "x=1x6x256")
    assert code == 0, err
    assert_same_outputs(path, path.with_name("seq.pruned.onnx"), feeds={"x": rng.standard_normal((2, 9, 256)).astype(np.float32)})


def test_real_resnet20(capsys, shared_dir, tmp_path):
    src = shared_model(shared_dir, "resnet20_cifar10.onnx")
    digest = src.read_bytes()
    full, pruned = tmp_path / "r20.full.onnx", tmp_path / "r20.pruned.onnx"
    report_path = tmp_path / "r20.json"
    code, _, err = _cli(capsys, src, "--full-rank", "-o", full, "--no-bench")
    assert code == 0, err
    assert_same_outputs(src, full)
    code, _, err = _cli(capsys, src, "--target-params", "0.7", "-o", pruned, "--report", report_path, "--no-bench")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    _check_report(report)
    assert report["pruned"]["params"] <= 0.7 * report["original"]["params"]
    (logits,) = run(pruned, random_feeds(src))
    assert logits.shape == (2, 10)
    assert src.read_bytes() == digest


def test_real_efficientnet_lite0(capsys, shared_dir, tmp_path):
    src = shared_model(shared_dir, "efficientnet_lite0_imagenet.onnx")
    out_path, report_path = tmp_path / "eff.onnx", tmp_path / "eff.json"
    code, _, err = _cli(capsys, src, "--energy", "0.999", "-o", out_path, "--report", report_path, "--no-bench")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    _check_report(report)
    actions = {layer["action"] for layer in report["layers"]}
    assert "skipped" in actions  # the 16 depthwise Conv
    assert sum("depthwise" in layer["reason"] for layer in report["layers"]) == 16
    feeds = random_feeds(src, batch=1)
    (ref,), (got,) = run(src, feeds), run(out_path, feeds)
    assert ref.shape == got.shape == (1, 1000)


# ---------------------------------------------------------------------------------------------
# Entry points (one real process each)


def test_python_dash_m_entry_point(tmp_path, digits):
    out_path = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnx_basisprune", str(digits), "--energy", "0.95", "-o", str(out_path), "--no-bench"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out_path}" in proc.stdout
    onnx.checker.check_model(str(out_path), full_check=True)


def test_console_script_entry_point(tmp_path):
    script = Path(sys.executable).with_name("onnx-basisprune")
    if not script.is_file():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("onnx-basisprune ")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model" * 64)
    proc = subprocess.run([str(script), str(junk), "--no-bench"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(PREFIX), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]


# ---------------------------------------------------------------------------------------------
# Bad input, one at a time: exit 2, one line on stderr, nothing written


def _bad_models() -> dict[str, object]:
    """name -> writer(path) creating the bad input (or None when the path must not exist)."""
    rng = np.random.default_rng(0)

    def save(model):
        return lambda p: onnx.save(model, str(p))

    def unchecked(nodes, inputs, outputs, inits=()):
        graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info(*i) for i in inputs],
                                  [helper.make_tensor_value_info(*o) for o in outputs], initializer=list(inits))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return save(model)

    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    return {
        "missing file": None,
        "a directory": lambda p: p.mkdir(),
        "random bytes": lambda p: p.write_bytes(rng.bytes(5000)),
        "empty file": lambda p: p.write_bytes(b""),
        "truncated protobuf": lambda p: p.write_bytes(EXAMPLE_MODEL.read_bytes()[: EXAMPLE_MODEL.stat().st_size // 2]),
        "unknown input name": unchecked(
            [helper.make_node("Conv", ["x", "W_missing"], ["y"], name="c", kernel_shape=[3, 3])],
            [("x", TensorProto.FLOAT, [1, 16, 8, 8])], [("y", TensorProto.FLOAT, [1, 24, 6, 6])]),
        "missing required attribute": unchecked(
            [helper.make_node("Cast", ["x"], ["y"], name="c")], [("x", TensorProto.FLOAT, [1, 3])], [("y", TensorProto.FLOAT, [1, 3])]),
        "only Relu": save(make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, ["N", 3])],
                                     [("y", TensorProto.FLOAT, ["N", 3])])),
        "weight is a graph input": save(make_model(
            [helper.make_node("Conv", ["x", "W"], ["y"], name="c", kernel_shape=[3, 3])],
            [("x", TensorProto.FLOAT, ["N", 16, 20, 20]), ("W", TensorProto.FLOAT, [24, 16, 3, 3])],
            [("y", TensorProto.FLOAT, ["N", 24, 18, 18])])),
        "integer MatMul": save(make_model(
            [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", TensorProto.INT32, ["N", 256])],
            [("y", TensorProto.INT32, ["N", 200])], [tensor("W", rng.integers(-3, 3, (256, 200)).astype(np.int32))])),
        "only depthwise Conv": save(make_model(
            [helper.make_node("Conv", ["x", "W"], ["y"], name="dw", group=16, kernel_shape=[3, 3])],
            [("x", TensorProto.FLOAT, ["N", 16, 20, 20])], [("y", TensorProto.FLOAT, ["N", 16, 18, 18])],
            [tensor("W", w[:16, :1])])),
    }


BAD = _bad_models()
EXPECTED = {
    "missing file": "no such file",
    "a directory": "not a file",
    "random bytes": "not",
    "empty file": "not",
    "truncated protobuf": "not a readable ONNX model",
    "unknown input name": "onnx.checker",
    "missing required attribute": "onnx.checker",
    "only Relu": "nothing to decompose",
    "weight is a graph input": "weight is not a constant",
    "integer MatMul": "unsupported weight dtype",
    "only depthwise Conv": "depthwise",
}


def _assert_one_error_line(code: int, err: str, expect: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    assert expect in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(capsys, tmp_path, case):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "model.onnx"
    if BAD[case] is not None:
        BAD[case](path)
    before = _listing(folder)
    code, out, err = _cli(capsys, path, "--no-bench")
    _assert_one_error_line(code, err, EXPECTED[case])
    assert _listing(folder) == before, "nothing may be written"
    assert sorted(p.name for p in folder.iterdir()) == ([] if BAD[case] is None else ["model.onnx"])
    # inspect refuses it the same way (where the file is at least a file)
    code, out, err = _cli(capsys, "inspect", path)
    _assert_one_error_line(code, err, EXPECTED[case])


def test_output_in_a_missing_folder(capsys, digits, tmp_path):
    before = _listing(tmp_path)
    code, _, err = _cli(capsys, digits, "-o", tmp_path / "nope" / "x.onnx", "--no-bench")
    _assert_one_error_line(code, err, "does not exist")
    assert _listing(tmp_path) == before and not (tmp_path / "nope").exists()


def test_output_equal_to_the_input(capsys, digits, tmp_path, monkeypatch):
    before = _listing(tmp_path)
    code, _, err = _cli(capsys, digits, "-o", digits, "--no-bench")
    _assert_one_error_line(code, err, "overwrite the input")
    # the same file by another spelling
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, digits, "-o", "./digits.onnx", "--no-bench")
    _assert_one_error_line(code, err, "overwrite the input")
    assert _listing(tmp_path) == before


def test_output_is_a_directory(capsys, digits, tmp_path):
    (tmp_path / "outdir").mkdir()
    before = _listing(tmp_path)
    code, _, err = _cli(capsys, digits, "-o", tmp_path / "outdir", "--no-bench")
    _assert_one_error_line(code, err, "directory")
    assert _listing(tmp_path) == before


def test_unreachable_target(capsys, digits, tmp_path):
    before = _listing(tmp_path)
    code, _, err = _cli(capsys, digits, "--target-params", "0.01", "--no-bench")
    _assert_one_error_line(code, err, "out of reach")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "abc", "nan"])
def test_invalid_energy_is_an_argparse_error(capsys, digits, tmp_path, value):
    before = _listing(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([str(digits), "--energy", value, "--no-bench"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(PREFIX + " argument --energy")
    assert "Traceback" not in err
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("value", ["a", "1,x", "0", "1,-8", ""])
def test_invalid_bench_batch_is_an_argparse_error(capsys, digits, tmp_path, value):
    before = _listing(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([str(digits), "--bench-batch", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(PREFIX + " argument --bench-batch")
    assert _listing(tmp_path) == before


def test_conflicting_targets_are_an_argparse_error(capsys, digits):
    with pytest.raises(SystemExit) as exc:
        main([str(digits), "--energy", "0.9", "--target-params", "0.5"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cnn_model_written_by_the_test_helpers_runs_through_the_cli(capsys, tmp_path):
    """A model with several layer kinds: the report lists every Conv and the Gemm."""
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(path))
    report_path = tmp_path / "cnn.json"
    code, _, err = _cli(capsys, path, "--energy", "0.99", "--report", report_path, "--no-bench")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    _check_report(report)
    assert [layer["name"] for layer in report["layers"]] == ["conv1", "conv2", "conv3", "conv4", "fc"]
    assert os.path.exists(tmp_path / "cnn.pruned.onnx")
