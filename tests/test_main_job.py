"""The main job end to end (``--calib``) on the built-in example, and its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from onnx_basisprune.cli import main
from onnx_basisprune.pipeline import calibrated

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits"


def _heldout_accuracy(model_path: Path) -> float:
    xs, ys = [], []
    for folder in sorted((EXAMPLE / "heldout").iterdir()):
        for png in sorted(folder.glob("*.png")):
            xs.append(np.asarray(Image.open(png).convert("L"), dtype=np.float32)[None] / 255.0)
            ys.append(int(folder.name))
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": np.stack(xs)})[0]
    return float((logits.argmax(1) == np.array(ys)).mean())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("main") / "digits.pruned.onnx"
    report = out.with_suffix(".json")
    code = main([str(EXAMPLE / "model.onnx"), "--calib", str(EXAMPLE / "calib"), "--eval", str(EXAMPLE / "heldout"),
                 "-o", str(out), "--report", str(report)])
    assert code == 0
    return out, json.loads(report.read_text())


def test_main_job_prunes_within_the_quality_budget(pruned):
    out, report = pruned
    q = report["quality"]
    assert q["metric"] == "accuracy" and q["n"] == 540
    assert q["pruned"] >= q["original"] - 0.01
    assert report["pruned"]["params"] < 0.8 * report["original"]["params"]
    assert report["pruned"]["macs"] < report["original"]["macs"]
    # the quality in the report is what onnxruntime measures on the written file
    assert _heldout_accuracy(out) == pytest.approx(q["pruned"], abs=1e-9)
    assert {"samples", "seconds", "loss", "criterion"} <= set(report["calibration"])
    assert report["sweep"] and all({"threshold", "params", "macs", "quality", "passed"} <= set(p) for p in report["sweep"])


def test_main_job_output_has_no_gates_and_passes_checker(pruned):
    out, report = pruned
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert ops <= {"Conv", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"}
    roles = {p.value for n in model.graph.node for p in n.metadata_props if p.key == "basisprune.role"}
    assert roles == {"basis", "scaling"}
    actions = {layer["action"] for layer in report["layers"]}
    assert "decomposed" in actions and actions <= {"decomposed", "recomposed", "kept", "skipped"}


def test_unlabeled_calibration_uses_agreement(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, png in enumerate(sorted((EXAMPLE / "calib").glob("*/*.png"))[:120]):
        (flat / f"{i}.png").write_bytes(png.read_bytes())
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main([str(EXAMPLE / "model.onnx"), "--calib", str(flat), "--criterion", "taylor", "--target-params", "0.6",
                 "-o", str(out), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["quality"]["metric"] == "agreement"
    assert data["calibration"]["loss"] == "self" and data["calibration"]["criterion"] == "taylor"
    assert data["pruned"]["params"] <= 0.6 * data["original"]["params"]


def _run_bad(tmp_path, capsys, *extra: str) -> str:
    out = tmp_path / "out.onnx"
    code = main([str(EXAMPLE / "model.onnx"), "-o", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert not out.exists()
    assert len(err.splitlines()) == 1 and err.startswith("onnx-basisprune: error:"), err
    return err


def test_missing_calibration_folder(tmp_path, capsys):
    assert "not found" in _run_bad(tmp_path, capsys, "--calib", str(tmp_path / "nope"))


def test_empty_calibration_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _run_bad(tmp_path, capsys, "--calib", str(tmp_path / "empty"))


def test_corrupt_image(tmp_path, capsys):
    folder = tmp_path / "bad" / "0"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"not a png")
    assert "a.png" in _run_bad(tmp_path, capsys, "--calib", str(tmp_path / "bad"))


def test_labels_beyond_the_model_outputs(tmp_path, capsys):
    root = tmp_path / "many"
    for k in range(12):  # 12 classes, the model has 10 outputs
        (root / f"c{k:02d}").mkdir(parents=True)
        Image.new("L", (32, 32), color=k * 10).save(root / f"c{k:02d}" / "x.png")
    _run_bad(tmp_path, capsys, "--calib", str(root))


def test_wrong_array_shape(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 5, 5), dtype=np.float32))
    _run_bad(tmp_path, capsys, "--calib", str(tmp_path / "x.npy"))


def test_max_drop_without_calibration(tmp_path, capsys):
    _run_bad(tmp_path, capsys, "--max-drop", "1")


def test_graph_side_never_imports_torch():
    """Every graph-side module imports without torch (only onnx_basisprune.calibration may)."""
    code = ("import sys, pkgutil, importlib, onnx_basisprune\n"
            "for m in pkgutil.walk_packages(onnx_basisprune.__path__, 'onnx_basisprune.'):\n"
            "    if not m.name.startswith('onnx_basisprune.calibration') and m.name != 'onnx_basisprune.__main__': importlib.import_module(m.name)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def _imports(path: Path, package: str) -> set[str]:
    """The package modules ``path`` imports, at the top or inside functions."""
    import ast

    here = package + "." + path.stem if path.stem != "__init__" else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here.rsplit(".", node.level)[0] if path.stem != "__init__" else here.rsplit(".", node.level - 1)[0]
            target = f"{base}.{node.module}" if node.module else base
            found |= {f"{target}.{a.name}" for a in node.names} | ({target} if node.module else set())
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnx_basisprune"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_import_cycles_and_no_argparse_below_the_cli():
    """Modules import each other in one direction (lazy imports count too), and only cli.py parses
    arguments."""
    package = ROOT / "onnx_basisprune"
    sources = {f"onnx_basisprune.{p.relative_to(package).with_suffix('').as_posix().replace('/', '.')}": p
               for p in package.rglob("*.py")}
    sources = {name.removesuffix(".__init__"): p for name, p in sources.items()}
    sources.update({f"onnx_basisprune.calibration.{p.stem}": p for p in (ROOT / "calibration").glob("*.py") if p.stem != "__init__"})
    graph = {name: {m for m in _imports(path, name.rsplit(".", 1)[0] if path.stem != "__init__" else name) if m in sources and m != name}
             for name, path in sources.items()}
    for name, path in sources.items():
        if not name.endswith(".cli"):
            assert "import argparse" not in path.read_text(), name
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def _images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for sub in sorted(folder.iterdir()):
        for png in sorted(sub.glob("*.png")):
            xs.append(np.asarray(Image.open(png).convert("L"), dtype=np.float32)[None] / 255.0)
            ys.append(int(sub.name))
    return np.stack(xs), np.array(ys)


def test_python_api_runs_the_main_job(tmp_path, capsys):
    """``prune(model, calib=..., target_macs=...)`` as the README shows it; arrays work as folders do."""
    from onnx_basisprune import prune

    model = onnx.load(str(EXAMPLE / "model.onnx"))
    before = model.SerializeToString()
    result = prune(model, calib=EXAMPLE / "calib", eval=EXAMPLE / "heldout", target_macs=0.7, progress=False)
    assert model.SerializeToString() == before  # the caller's model is never changed
    assert result.pruned.macs <= 0.7 * result.original.macs
    assert result.quality.metric == "accuracy" and result.quality.n == 540
    assert result.calibration["criterion"] == "fisher" and result.calibration["fit"] == "sequential"
    result.save(tmp_path / "m.onnx")
    assert _heldout_accuracy(tmp_path / "m.onnx") == pytest.approx(result.quality.pruned, abs=1e-9)
    report = json.loads(json.dumps(result.to_json()))
    assert report["quality"]["drop_bound"] == result.quality.drop_bound and "sweep" not in report
    assert "calibration:" not in capsys.readouterr().out  # progress=False is quiet

    x, y = _images(EXAMPLE / "calib")
    hx, hy = _images(EXAMPLE / "heldout")
    from_arrays = prune(EXAMPLE / "model.onnx", calib={"input": x, "labels": y}, eval={"input": hx, "labels": hy},
                        target_macs=0.7, progress=False)
    assert from_arrays.quality.n == 540
    assert abs(from_arrays.quality.pruned - result.quality.pruned) <= 0.02


def test_python_api_refuses_bad_options_in_one_line():
    from onnx_basisprune import BasisPruneError, prune

    with pytest.raises(BasisPruneError, match="give one of"):
        prune(EXAMPLE / "model.onnx", energy=0.9, target_macs=0.5)
    with pytest.raises(BasisPruneError, match="need calibration data"):
        prune(EXAMPLE / "model.onnx", max_drop=1)
    with pytest.raises(BasisPruneError, match="criterion must be one of"):
        prune(EXAMPLE / "model.onnx", calib=EXAMPLE / "calib", criterion="magic")


def test_each_candidate_is_built_once_and_scored_and_timed_in_one_session(tmp_path, monkeypatch):
    """The search builds each candidate once and opens one onnxruntime session for it (scored and
    timed in it); the chosen one is handed over as built. The other sessions are a few: the
    original's predictions, the interpreter's check, the timing reference, the
    speed check (two per timing), the check before writing and two tiny probes of the GPU providers."""
    opened = []
    original = ort.InferenceSession

    class Counted(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            opened.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Counted)
    built = []
    build = calibrated.final_model
    monkeypatch.setattr(calibrated, "final_model", lambda *args, **kwargs: built.append(1) or build(*args, **kwargs))
    out = tmp_path / "digits.pruned.onnx"
    report = tmp_path / "r.json"
    assert main([str(EXAMPLE / "model.onnx"), "--calib", str(EXAMPLE / "calib"), "--eval", str(EXAMPLE / "heldout"),
                 "--no-latency-aware", "-o", str(out), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    sweep = data["sweep"]
    assert all(p["latency_ratio"] > 0 for p in sweep)
    timings = 1 + data["speed_check"]["retimed"]
    assert len(opened) <= len(sweep) + 6 + 2 * timings, (len(opened), len(sweep), timings)
    assert len(built) == len(sweep) + data["speed_check"]["retimed"]  # the chosen candidate is not built again
