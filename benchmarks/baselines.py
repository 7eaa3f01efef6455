"""Baselines that onnx-basisprune is compared against, pruned to the same budget on the same
calibration images, without fine-tuning, and measured the same way.

    python benchmarks/baselines.py --model M.onnx --calib DIR --test DIR --target-macs 0.8,0.6,0.4
           [--methods torch-pruning,onnxsim-l2,onnxsim-wanda] [--limit 2000] [--test-limit N]
           [--weights M.pth] [--global-sparsity] [--keep-constant-nodes] [--out-dir DIR] [--json out.json]

Methods
-------
* ``torch-pruning`` (:func:`torch_pruning_taylor`): Torch-Pruning's ``BasePruner`` (``MetaPruner``)
  with ``TaylorImportance()`` (first-order ``|w·∂L/∂w|`` summed per channel, Molchanov et al.
  2016/2019 as the package implements it), global ranking, the classifier output layer ignored.
  Gradients: cross-entropy on the calibration labels (on the model's own predictions for an
  unlabeled folder), summed over the calibration images in eval mode (BatchNorm statistics and
  Dropout as at inference), once; then one-shot pruning at the global ``pruning_ratio`` found by
  a bracketing search (regula falsi / bisection, see :func:`_bisect`) so that params/MACs land
  on the target (each trial prunes a fresh copy with the same gradients). It needs the PyTorch
  model: a ``.pth`` state_dict of torchvision's MobileNetV2 (``--weights``, default ``MODEL.pth``
  beside the ONNX file; classifier size from the weights),
  or, for the akamaster/pytorch_resnet_cifar10 ResNets, a rebuild from the ONNX graph itself
  (:func:`cifar_resnet_from_onnx`: BatchNorm already folded, Conv with bias, option-A shortcut as
  an explicit channel map :class:`ShortcutA` with its own Torch-Pruning pruner). Either Torch
  model is checked against onnxruntime on real images (max relative error <= 1e-4) before use.
  The pruned model is exported to ONNX (opset 17, dynamic batch; BatchNorm folded by the exporter).
* ``onnxsim-l2`` / ``onnxsim-wanda`` (:func:`onnxsim_structured`): onnxsim's ONNX-native
  structured pruning, ``onnxsim.pruning.apply_structured_pruning`` (filter L2 norm, Li et al.) and
  ``apply_structured_wanda_pruning`` (``||W_row||·||X||`` on the calibration images, given as the
  tool's preprocessed numpy batches), its ``sparsity`` searched the same way to the target.
  Default per-chain mode (``global_sparsity=False``: every matched chain loses the same fraction
  of its channels),
  which covers residual groups; ``global_sparsity=True`` ranks plain chains globally but leaves
  residual/merge groups untouched. Both are given the model with its Constant nodes turned into
  initializers (:func:`lift_constants`: same function and params; the C++ pass behind Wanda only
  crosses a ReLU6 ``Clip`` whose bounds are initializers). onnxsim only cuts the topologies it
  can prove safe; a target below what its maximum sparsity reaches is reported as out of reach,
  with the model it did reach.

Measurement (as for onnx-basisprune's own models): params and MACs as
``onnx_basisprune.api.prepare(model).original`` computes them (:func:`model_cost`; params =
elements of all constant tensors, MACs = Conv/ConvTranspose/Gemm/MatMul multiply-accumulates at
batch 1 after the tool's normalisation), file size, top-1 test
accuracy with onnxruntime CPU on the test folder read by the tool's default loader, time taken.
The target is a fraction of the original's params or MACs that remains; a result is ``reached``
when it lands within ``tolerance`` (0.01, i.e. one percentage point of the original) of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # small SVDs in prepare(): OpenBLAS threads on shared cores only slow them down
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: use this checkout's package
    sys.path.insert(0, str(REPO))

from onnx_basisprune.calibration.data import CalibrationSet, InputSpec, load_calibration  # noqa: E402

METHODS = ("torch-pruning", "torch-pruning-round", "onnxsim-l2", "onnxsim-wanda")
# torch-pruning-round: Torch-Pruning with round_to = the CPU provider's channel block (8, 16 with
# AVX-512), so its latency is not penalised by channel counts off the block.
DEFAULT_OUT = REPO / "build" / "benchmarks" / "baselines"
TOLERANCE = 0.01  # |reached fraction - target| allowed, in fractions of the original
OPSET = 17
VERIFY_TOL = 1e-4  # max relative error Torch model vs onnxruntime


class BaselineError(RuntimeError):
    """A baseline cannot be run on this case; the message says why."""


@dataclass
class BaselineResult:
    method: str  # "torch-pruning", "onnxsim-l2", "onnxsim-wanda" or "original"
    target_kind: str  # "params" or "macs"
    target: float  # fraction of the original that should remain
    params: int
    macs: int
    file_bytes: int
    test_accuracy: float | None
    test_n: int
    seconds: float  # time to produce the model (data loading, importance, search, export), not the test
    model_path: str
    note: str = ""
    original_params: int = 0
    original_macs: int = 0
    reached: bool = True  # the kept fraction is within the tolerance of the target
    setting: dict[str, Any] = field(default_factory=dict)  # what produced it: pruning ratio / sparsity, ...
    extra: dict[str, Any] = field(default_factory=dict)  # timings, calibration size, search trace

    @property
    def params_fraction(self) -> float:
        return self.params / self.original_params if self.original_params else float("nan")

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.original_macs if self.original_macs else float("nan")

    def to_json(self) -> dict:
        return {**asdict(self), "params_fraction": round(self.params_fraction, 6),
                "macs_fraction": round(self.macs_fraction, 6)}

    def line(self) -> str:
        acc = "n/a" if self.test_accuracy is None else f"{self.test_accuracy:.4f} ({self.test_n})"
        flag = "" if self.reached else "  [target not reached]"
        return (f"{self.method:14s} {self.target_kind} {self.target:.3f}: params {self.params_fraction:.3f} "
                f"MACs {self.macs_fraction:.3f}  acc {acc}  {self.seconds:.0f}s  {self.model_path}{flag}")


# --------------------------------------------------------------------------- measuring


def model_cost(model: str | os.PathLike | onnx.ModelProto) -> tuple[int, int]:
    """(params, MACs) exactly as onnx-basisprune counts its own models, i.e. the steps by which
    ``onnx_basisprune.api.prepare(model).original`` is computed: params = elements of all
    constant tensors of the model as given, MACs = ``cost.model_cost`` of the normalised model
    with its inferred shapes (batch 1). Done without ``prepare``'s per-layer SVD analysis, which
    is slow and raises when no layer is worth splitting (a heavily pruned model)."""
    from onnx_basisprune.pipeline.prepared import as_ir as _as_ir
    from onnx_basisprune.io.cost import count_params
    from onnx_basisprune.io.cost import model_cost as graph_cost
    from onnx_basisprune.io.normalize import normalize
    from onnx_basisprune.io.shapes import infer_shapes

    irm = _as_ir(model if isinstance(model, onnx.ModelProto) else str(model))
    params = count_params(irm)
    normalize(irm)
    return int(params), int(graph_cost(irm, infer_shapes(irm)).macs)


def _session(model: str | os.PathLike | onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def load_folder(model: str | os.PathLike | onnx.ModelProto, folder: str | os.PathLike,
                limit: int | None = None, seed: int = 0) -> CalibrationSet:
    """``folder`` read by the tool's default loader for ``model``'s input (``limit``: class-balanced subset)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return load_calibration(folder, InputSpec.from_model(proto), limit=limit, seed=seed)


def test_accuracy(model: str | os.PathLike, folder: str | os.PathLike, limit: int | None = None,
                  seed: int = 0, batch_size: int = 256) -> tuple[float, int]:
    """Top-1 accuracy with onnxruntime CPU on ``folder`` (all of it unless ``limit``), as
    ``benchmarks/run_benchmarks.py`` measures onnx-basisprune's models."""
    data = load_folder(model, folder, limit, seed)
    if data.labels is None:
        raise BaselineError(f"test folder {folder} has no class subfolders (no labels)")
    sess = _session(model)
    preds = [sess.run(None, batch)[0].argmax(1) for batch, _ in data.batches(batch_size)]
    return float((np.concatenate(preds) == data.labels).mean()), len(data)


def _max_rel_error(reference: np.ndarray, other: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    scale = np.abs(reference).max()
    return float(np.abs(reference - np.asarray(other, np.float64)).max() / (scale if scale > 0 else 1.0))


def _input_name(model: onnx.ModelProto) -> str:
    specs = InputSpec.from_model(model)
    if len(specs) != 1:
        raise BaselineError(f"expected one model input, got {[s.name for s in specs]}")
    return specs[0].name


# --------------------------------------------------------------------------- Torch models


class ShortcutA(nn.Module):
    """The option-A shortcut of the CIFAR ResNets (``x[:, :, ::2, ::2]`` zero-padded on channels),
    written as an explicit channel map so that Torch-Pruning can prune both sides of it:
    ``out[:, j] = x[:, index[j], ::s, ::s]``, where ``index[j] == in_channels`` means a zero channel."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        pad = (out_channels - in_channels) // 2
        index = torch.full((out_channels,), in_channels, dtype=torch.long)
        index[pad:pad + in_channels] = torch.arange(in_channels)
        self.in_channels = in_channels
        self.stride = stride
        self.register_buffer("index", index)

    @property
    def out_channels(self) -> int:
        return int(self.index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        x = F.pad(x, (0, 0, 0, 0, 0, 1))  # one zero channel at position in_channels
        return x.index_select(1, self.index)


def _shortcut_pruner():
    """Torch-Pruning pruner for :class:`ShortcutA`: input and output channels are independent
    (like a Conv's); a dropped input channel that an output still maps to becomes a zero channel."""
    import torch_pruning as tp

    class ShortcutAPruner(tp.pruner.BasePruningFunc):
        TARGET_MODULES = (ShortcutA,)

        def prune_out_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
            drop = set(int(i) for i in idxs)
            keep = [j for j in range(layer.out_channels) if j not in drop]
            layer.index = layer.index[keep].clone()
            return layer

        def prune_in_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
            drop = set(int(i) for i in idxs)
            kept = [c for c in range(layer.in_channels) if c not in drop]
            new_position = {c: i for i, c in enumerate(kept)}
            zero = len(kept)
            layer.index = torch.tensor([new_position.get(int(c), zero) for c in layer.index], dtype=torch.long)
            layer.in_channels = zero
            return layer

        def get_out_channels(self, layer: ShortcutA) -> int:
            return layer.out_channels

        def get_in_channels(self, layer: ShortcutA) -> int:
            return layer.in_channels

    return ShortcutAPruner()


class BasicBlock(nn.Module):
    """akamaster BasicBlock with BatchNorm folded into the convolutions (Conv with bias)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=True)
        self.shortcut = ShortcutA(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        return F.relu(self.conv2(out) + self.shortcut(x))


class CifarResNet(nn.Module):
    """akamaster/pytorch_resnet_cifar10 ResNet (20/32/44/56/110): 3 stages of ``n`` BasicBlocks."""

    def __init__(self, blocks_per_stage: int, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=True)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and b == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.shape[3])
        return self.linear(out.flatten(1))


def cifar_resnet_from_onnx(model: str | os.PathLike | onnx.ModelProto) -> CifarResNet:
    """Rebuild an akamaster CIFAR ResNet (BatchNorm folded) from its ONNX export: architecture
    from the Conv count and weight shapes, weights from the initializers (Conv nodes in graph
    order = the modules' forward order). Raises :class:`BaselineError` when the graph is not one."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    ops = {n.op_type for n in proto.graph.node}
    if (len(convs) - 1) % 6 or len(convs) < 7 or len(gemms) != 1 or "Pad" not in ops:
        raise BaselineError(f"not an akamaster CIFAR ResNet ({len(convs)} Conv, {len(gemms)} Gemm, Pad {'Pad' in ops})")
    n = (len(convs) - 1) // 6
    widths = [int(inits[convs[1 + 2 * n * s].input[1]].shape[0]) for s in range(3)]
    fc_w = inits[gemms[0].input[1]]
    transposed = any(a.name == "transB" and a.i == 1 for a in gemms[0].attribute)
    fc_w = fc_w if transposed else fc_w.T
    net = CifarResNet(n, widths, num_classes=fc_w.shape[0])
    modules = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    for node, conv in zip(convs, modules):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1])
        b = inits.get(node.input[2]) if len(node.input) > 2 else None
        if (w is None or b is None or tuple(w.shape) != tuple(conv.weight.shape)
                or list(attrs.get("strides", [1, 1])) != list(conv.stride) or attrs.get("group", 1) != 1):
            raise BaselineError(f"Conv {node.name} does not fit a CIFAR ResNet-{6 * n + 2} with BatchNorm folded")
        conv.weight.data = torch.from_numpy(np.array(w, np.float32))
        conv.bias.data = torch.from_numpy(np.array(b, np.float32))
    if tuple(fc_w.shape) != tuple(net.linear.weight.shape) or len(gemms[0].input) < 3:
        raise BaselineError("the Gemm does not fit the CIFAR ResNet classifier")
    net.linear.weight.data = torch.from_numpy(np.array(fc_w, np.float32))
    net.linear.bias.data = torch.from_numpy(np.array(inits[gemms[0].input[2]], np.float32))
    return net.eval()


def mobilenet_v2_from_pth(weights: str | os.PathLike) -> nn.Module:
    """torchvision MobileNetV2 with ``classifier[1] = Linear(1280, classes)`` from a state_dict."""
    import torchvision

    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if "classifier.1.weight" not in state or "features.0.0.weight" not in state:
        raise BaselineError(f"{weights} is not a torchvision MobileNetV2 state_dict")
    net = torchvision.models.mobilenet_v2()
    net.classifier[1] = nn.Linear(net.last_channel, state["classifier.1.weight"].shape[0])
    net.load_state_dict(state)
    return net.eval()


def torch_model_for(model: str | os.PathLike, weights: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """The PyTorch model behind an ONNX file, and where it came from: ``weights`` (or ``MODEL.pth``
    beside it) as a torchvision MobileNetV2 state_dict, else a CIFAR ResNet rebuilt from the graph."""
    path = Path(model)
    pth = Path(weights) if weights is not None else path.with_suffix(".pth")
    if weights is not None and not pth.is_file():
        raise BaselineError(f"weights not found: {pth}")
    if pth.is_file():
        return mobilenet_v2_from_pth(pth), f"torchvision MobileNetV2 from {pth}"
    try:
        return cifar_resnet_from_onnx(path), "CIFAR ResNet rebuilt from the ONNX initializers"
    except BaselineError as exc:
        raise BaselineError(f"no PyTorch model for {path}: no {pth.name} beside it, and {exc}") from None


def verify_torch_model(net: nn.Module, model: str | os.PathLike, data: CalibrationSet, n: int = 256,
                       tol: float = VERIFY_TOL) -> float:
    """Max relative error of ``net`` against onnxruntime on the first ``n`` samples of ``data``;
    raises :class:`BaselineError` above ``tol``."""
    name = _input_name(onnx.load(str(model), load_external_data=False))
    sess = _session(model)
    worst, seen = 0.0, 0
    for batch, _ in data.batches(min(n, 128)):
        ref = sess.run(None, batch)[0]
        with torch.no_grad():
            got = net.eval()(torch.from_numpy(batch[name])).numpy()
        worst = max(worst, _max_rel_error(ref, got))
        seen += len(ref)
        if seen >= n:
            break
    if worst > tol:
        raise BaselineError(f"the PyTorch model differs from {model} on onnxruntime: max rel. error {worst:.3g} > {tol:g}")
    return worst


def _classifier(net: nn.Module) -> nn.Module:
    """The output layer: the last Linear (or Conv) in module order."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1]


def torch_cost(net: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(params, MACs) of a Torch model as its ONNX export will count them at batch 1: Conv/Linear
    MACs from a forward pass; params = parameters less the BatchNorm weights (the exporter folds
    BatchNorm into the Conv: weight and bias become the Conv's weight scale and a bias of the
    same size), plus :class:`ShortcutA` index constants. Shape constants of the graph are not in it."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        per_sample = output[:1].numel()
        if isinstance(module, nn.Conv2d):
            macs += per_sample * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:
            macs += per_sample * module.in_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            net.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in net.parameters())
    params -= sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine)
    params += sum(m.index.numel() for m in net.modules() if isinstance(m, ShortcutA))
    return int(params), int(macs)


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    """ONNX export like the benchmark models': opset 17, dynamic batch, TorchScript exporter
    (BatchNorm folded into Conv in eval mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), example[:1], str(path), dynamo=False, opset_version=OPSET,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


# --------------------------------------------------------------------------- search


_COARSE_STEPS = 20  # grid of the search for a reachable upper end of the bracket


@dataclass
class _Trial:
    x: float
    fraction: float
    artifact: Any


def _bisect(evaluate: Callable[[float], tuple[float, Any]], target: float, lo: float, hi: float,
            stop: float, max_steps: int) -> tuple[_Trial, list[tuple[float, float]], bool]:
    """Find x in [lo, hi] whose kept fraction (non-increasing in x, 1 at ``lo``) is closest to
    ``target``: a bracketing search (regula falsi with the Illinois correction, each step kept
    inside the bracket, so it converges like bisection on step-shaped curves and faster on smooth
    ones). Stops within ``stop`` of the target or after ``max_steps`` evaluations past the first.
    Returns the best trial, the (x, fraction) trace, and False when no x reaches the target.

    When ``hi`` keeps more than the target the curve may have turned back up near ``hi`` (seen with
    Torch-Pruning's ``round_to`` on ResNet-56: at high ratios it prunes nothing), so ``hi`` steps
    down a coarse grid until an x reaches the target and closes the bracket; False when none does."""
    trace: list[tuple[float, float]] = []

    def run(x: float) -> _Trial:
        fraction, artifact = evaluate(x)
        trace.append((round(x, 6), round(fraction, 6)))
        return _Trial(x, fraction, artifact)

    top = run(hi)
    closest = top
    for x in np.linspace(hi, lo, _COARSE_STEPS + 1)[1:-1]:
        if top.fraction <= target:
            break
        top = run(float(x))
        closest = min(closest, top, key=lambda t: abs(t.fraction - target))
    if top.fraction > target:
        return closest, trace, False
    hi = top.x
    best = top
    g_lo, g_hi, side = 1.0 - target, top.fraction - target, 0
    for _ in range(max_steps):
        if abs(best.fraction - target) <= stop or hi - lo < 1e-5:
            break
        x = (lo * g_hi - hi * g_lo) / (g_hi - g_lo) if g_hi != g_lo else (lo + hi) / 2
        margin = 0.02 * (hi - lo)
        mid = run(min(max(x, lo + margin), hi - margin))
        if abs(mid.fraction - target) < abs(best.fraction - target):
            best = mid
        if mid.fraction > target:
            lo, g_lo = mid.x, mid.fraction - target
            if side == 1:
                g_hi /= 2
            side = 1
        else:
            hi, g_hi = mid.x, mid.fraction - target
            if side == -1:
                g_lo /= 2
            side = -1
    return best, trace, True


def _kind(target_kind: str) -> int:
    if target_kind not in ("params", "macs"):
        raise ValueError(f"target_kind must be 'params' or 'macs', got {target_kind!r}")
    return 0 if target_kind == "params" else 1


def _check_targets(targets: Sequence[float]) -> None:
    for t in targets:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"targets are fractions in (0, 1], got {t}")


def _out_path(out_dir: Path, model: Path, method: str, kind: str, target: float) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{model.stem}.{method}.{kind}{target:.3f}.onnx"


def _progress(result: BaselineResult, progress: bool) -> None:
    if progress:
        print(result.line(), file=sys.stderr, flush=True)


def _finish(method: str, kind: str, target: float, path: Path, original: tuple[int, int], seconds: float,
            test: str | os.PathLike | None, test_limit: int | None, seed: int, tolerance: float,
            note: list[str], setting: dict, extra: dict, progress: bool) -> BaselineResult:
    params, macs = model_cost(path)
    fraction = (params, macs)[_kind(kind)] / original[_kind(kind)]
    reached = abs(fraction - target) <= tolerance
    if not reached:
        note.append(f"landed on {fraction:.4f}, not within {tolerance:g} of {target:g}")
    acc, n = None, 0
    if test is not None:
        t0 = time.perf_counter()
        acc, n = test_accuracy(path, test, test_limit, seed)
        extra["eval_seconds"] = round(time.perf_counter() - t0, 1)
    result = BaselineResult(method, kind, target, params, macs, path.stat().st_size, acc, n, round(seconds, 1),
                            str(path), "; ".join(note), original[0], original[1], reached, setting, extra)
    _progress(result, progress)
    return result


def original_result(model: str | os.PathLike, test: str | os.PathLike | None = None, test_limit: int | None = None,
                    seed: int = 0) -> BaselineResult:
    """The unpruned model measured the same way (method "original", target 1)."""
    params, macs = model_cost(model)
    acc, n = test_accuracy(model, test, test_limit, seed) if test is not None else (None, 0)
    return BaselineResult("original", "macs", 1.0, params, macs, Path(model).stat().st_size, acc, n, 0.0,
                          str(model), "", params, macs)


# --------------------------------------------------------------------------- Torch-Pruning


def taylor_gradients(net: nn.Module, data: CalibrationSet, input_name: str, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Gradients of the mean cross-entropy over ``data`` (labels, else the model's own top-1) in
    eval mode, accumulated over all samples; by parameter name."""
    net.eval()
    net.zero_grad(set_to_none=True)
    n = len(data)
    for batch, labels in data.batches(batch_size):
        x = torch.from_numpy(batch[input_name])
        logits = net(x)
        y = torch.from_numpy(labels) if labels is not None else logits.detach().argmax(1)
        if int(y.max()) >= logits.shape[1]:
            raise BaselineError(f"calibration label {int(y.max())} does not fit {logits.shape[1]} model outputs")
        (F.cross_entropy(logits, y, reduction="sum") / n).backward()
    grads = {name: p.grad.detach().clone() for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return grads


def _taylor_prune(net: nn.Module, grads: dict[str, torch.Tensor], example: torch.Tensor, ratio: float,
                  round_to: int | None = None) -> nn.Module:
    """A pruned copy of ``net``: one global Taylor pruning step at ``pruning_ratio=ratio``, channel
    counts rounded to multiples of ``round_to`` when given."""
    import torch_pruning as tp

    pruned = copy.deepcopy(net).eval()
    for name, p in pruned.named_parameters():
        if name in grads:
            p.grad = grads[name].clone()
    if ratio <= 0:
        return pruned
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.BasePruner(
                pruned, example[:1], importance=tp.importance.TaylorImportance(), global_pruning=True,
                pruning_ratio=ratio, ignored_layers=[_classifier(pruned)], round_to=round_to,
                customized_pruners={ShortcutA: _shortcut_pruner()})
            pruner.step()
    except Exception as exc:  # a graph Torch-Pruning cannot trace or cut: one line, for the results table
        raise BaselineError(f"Torch-Pruning failed at pruning ratio {ratio:.4f}: "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    pruned.zero_grad(set_to_none=True)
    return pruned


def torch_pruning_taylor_sweep(model: str | os.PathLike, calib: str | os.PathLike, test: str | os.PathLike | None,
                               target_kind: str, targets: Sequence[float], *, weights: str | os.PathLike | None = None,
                               limit: int | None = 2000, seed: int = 0, batch_size: int = 64,
                               test_limit: int | None = None, out_dir: str | os.PathLike = DEFAULT_OUT,
                               tolerance: float = TOLERANCE, max_steps: int = 20, round_to: int | None = None,
                               progress: bool = True) -> list[BaselineResult]:
    """Torch-Pruning Taylor baseline at several budgets of one kind, sharing the Torch model, the
    calibration load and the gradient pass; each result's ``seconds`` = that shared setup + its
    own search and export (what a single run would take). ``round_to``: Torch-Pruning's channel
    rounding (the method is then named ``torch-pruning-round``)."""
    method = "torch-pruning" if round_to is None else "torch-pruning-round"
    kind = _kind(target_kind)
    _check_targets(targets)
    torch.manual_seed(seed)
    model = Path(model)
    t0 = time.perf_counter()
    proto = onnx.load(str(model), load_external_data=False)
    input_name, output_name = _input_name(proto), proto.graph.output[0].name
    net, source = torch_model_for(model, weights)
    data = load_folder(proto, calib, limit, seed)
    verify_data = load_folder(proto, test, 100, seed) if test is not None else data
    verify_err = verify_torch_model(net, model, verify_data)
    grads = taylor_gradients(net, data, input_name, batch_size)
    example = torch.from_numpy(next(data.batches(1))[0][input_name])
    original = model_cost(model)
    base = torch_cost(net, example)
    offset = original[0] - base[0]  # graph constants the Torch count does not see (shapes, ...)

    def evaluate(ratio: float) -> tuple[float, nn.Module]:
        pruned = _taylor_prune(net, grads, example, ratio, round_to)
        cost = torch_cost(pruned, example)
        return ((cost[0] + offset) / original[0] if kind == 0 else cost[1] / original[1]), pruned

    setup = time.perf_counter() - t0
    results = []
    for target in targets:
        t1 = time.perf_counter()
        best, trace, reachable = _bisect(evaluate, target, 0.0, 0.95, tolerance / 4, max_steps)
        path = _out_path(Path(out_dir), model, method, target_kind, target)
        export_onnx(best.artifact, example, path, input_name, output_name)
        export_err = verify_torch_model(best.artifact, path, data, n=64)
        note = [] if reachable else ["target out of reach at pruning ratio 0.95"]
        setting = {"pruning_ratio": best.x, "importance": "TaylorImportance() (first-order, group mean)",
                   "global_pruning": True, "ignored": "classifier output layer", "search": "bracketed search of pruning_ratio",
                   "round_to": round_to}
        extra = {"setup_seconds": round(setup, 1), "search_seconds": round(time.perf_counter() - t1, 1),
                 "calib_n": len(data), "torch_model": source, "torch_vs_onnx_rel_error": verify_err,
                 "export_rel_error": export_err, "trace": trace}
        results.append(_finish(method, target_kind, target, path, original,
                               setup + time.perf_counter() - t1, test, test_limit, seed, tolerance, note,
                               setting, extra, progress))
    return results


def torch_pruning_taylor(model: str | os.PathLike, calib: str | os.PathLike, test: str | os.PathLike | None,
                         target_kind: str, target: float, **kwargs) -> BaselineResult:
    """Torch-Pruning Taylor baseline at one budget (see :func:`torch_pruning_taylor_sweep`)."""
    return torch_pruning_taylor_sweep(model, calib, test, target_kind, [target], **kwargs)[0]


# --------------------------------------------------------------------------- onnxsim


def lift_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose top-level ``Constant`` nodes holding a tensor (``value``) are
    initializers instead: the same function and the same params count. onnxsim's C++ structured
    pruning (which ``apply_structured_wanda_pruning`` calls) only crosses a ``Clip`` (ReLU6) whose
    bounds are initializers, and the TorchScript exporter writes them as Constant nodes: without
    this, Wanda leaves MobileNetV2's expansion channels uncut while the Python L2 pass cuts them."""
    out = copy.deepcopy(proto)
    nodes = []
    for node in out.graph.node:
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                and node.attribute[0].name == "value"):
            tensor = copy.deepcopy(node.attribute[0].t)
            tensor.name = node.output[0]
            out.graph.initializer.append(tensor)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _onnxsim_prune(proto: onnx.ModelProto, method: str, sparsity: float, calibration: list | None,
                   global_sparsity: bool) -> onnx.ModelProto:
    from onnxsim import pruning

    if sparsity <= 0:
        return proto
    try:
        if method == "l2":
            return pruning.apply_structured_pruning(proto, sparsity=sparsity, importance_norm="l2",
                                                    global_sparsity=global_sparsity)
        return pruning.apply_structured_wanda_pruning(proto, calibration_data=calibration, sparsity=sparsity,
                                                      importance_norm="l2", providers=["CPUExecutionProvider"],
                                                      global_sparsity=global_sparsity)
    except Exception as exc:  # the C++ pass refusing a graph: one line, for the results table
        raise BaselineError(f"onnxsim {method} pruning failed at sparsity {sparsity:.4f}: "
                            f"{' '.join(str(exc).split())[:300]}") from exc


def onnxsim_structured_sweep(model: str | os.PathLike, calib: str | os.PathLike | None, test: str | os.PathLike | None,
                             target_kind: str, targets: Sequence[float], *, method: str = "l2",
                             limit: int | None = 2000, seed: int = 0, batch_size: int = 64,
                             global_sparsity: bool = False, constants_as_initializers: bool = True,
                             test_limit: int | None = None,
                             out_dir: str | os.PathLike = DEFAULT_OUT, tolerance: float = TOLERANCE,
                             max_steps: int = 20, progress: bool = True) -> list[BaselineResult]:
    """onnxsim structured pruning (``method`` "l2" or "wanda") with ``sparsity`` searched to each target.

    In per-chain mode the channel counts depend on ``sparsity`` alone, not on the importance, so
    Wanda's search runs on the (cheap, uncalibrated) L2 pruning and Wanda itself once at the
    sparsity found; if its cost differs from the L2 proxy, Wanda itself is searched.
    ``constants_as_initializers``: prune :func:`lift_constants` of the model (same function and
    params), so that the C++ pass behind Wanda crosses ReLU6 too. Even so the two passes do not
    always match the same chains (MobileNetV2: Wanda leaves the last Conv -> GlobalAveragePool ->
    Flatten -> Gemm chain whole, L2 cuts it), hence the check of the proxy."""
    if method not in ("l2", "wanda"):
        raise ValueError(f"method must be 'l2' or 'wanda', got {method!r}")
    kind = _kind(target_kind)
    _check_targets(targets)
    name = f"onnxsim-{method}"
    model = Path(model)
    t0 = time.perf_counter()
    proto = onnx.load(str(model))
    original = model_cost(proto)
    if constants_as_initializers:
        proto = lift_constants(proto)
    calibration, calib_n = None, 0
    if method == "wanda":
        if calib is None:
            raise BaselineError("onnxsim-wanda needs calibration data")
        data = load_folder(proto, calib, limit, seed)
        calibration = [batch for batch, _ in data.batches(batch_size)]
        calib_n = len(data)
    setup = time.perf_counter() - t0

    def evaluate(m: str) -> Callable[[float], tuple[float, onnx.ModelProto]]:
        def run(s: float) -> tuple[float, onnx.ModelProto]:
            pruned = _onnxsim_prune(proto, m, s, calibration, global_sparsity)
            return model_cost(pruned)[kind] / original[kind], pruned
        return run

    results = []
    for target in targets:
        t1 = time.perf_counter()
        note: list[str] = []
        proxy = method == "wanda" and not global_sparsity
        best, trace, reachable = _bisect(evaluate("l2" if proxy else method), target, 0.0, 0.999,
                                         tolerance / 4, max_steps)
        if proxy:
            fraction, pruned = evaluate("wanda")(best.x)
            if abs(fraction - best.fraction) > 1e-9:
                note.append(f"Wanda's cost at sparsity {best.x:.4f} differs from L2's; searched with Wanda itself")
                best, trace, reachable = _bisect(evaluate("wanda"), target, 0.0, 0.999, tolerance / 4, max_steps)
            else:
                best = _Trial(best.x, fraction, pruned)
        if not reachable:
            note.append(f"target out of reach: at sparsity 0.999 (every matched chain keeps 1 channel) "
                        f"it keeps {best.fraction:.4f} of the {target_kind}")
        path = _out_path(Path(out_dir), model, name, target_kind, target)
        onnx.save(best.artifact, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        setting = {"sparsity": best.x, "global_sparsity": global_sparsity, "importance_norm": "l2",
                   "constants_as_initializers": constants_as_initializers,
                   "search": "bracketed search of sparsity" + (" (on apply_structured_pruning's cost, same channel counts)"
                                                       if proxy else "")}
        extra = {"setup_seconds": round(setup, 1), "search_seconds": round(time.perf_counter() - t1, 1),
                 "calib_n": calib_n, "trace": trace, "reachable": reachable}
        results.append(_finish(name, target_kind, target, path, original, setup + time.perf_counter() - t1,
                               test, test_limit, seed, tolerance, note, setting, extra, progress))
    return results


def onnxsim_structured(model: str | os.PathLike, calib: str | os.PathLike | None, test: str | os.PathLike | None,
                       target_kind: str, target: float, *, method: str = "l2", **kwargs) -> BaselineResult:
    """onnxsim structured pruning at one budget (see :func:`onnxsim_structured_sweep`)."""
    return onnxsim_structured_sweep(model, calib, test, target_kind, [target], method=method, **kwargs)[0]


# --------------------------------------------------------------------------- all of them


def run_baselines(model: str | os.PathLike, calib: str | os.PathLike, test: str | os.PathLike | None,
                  target_kind: str, targets: Sequence[float], methods: Sequence[str] = METHODS,
                  **kwargs) -> list[BaselineResult]:
    """Every method in ``methods`` at every target. A method that cannot run on the case gives one
    result with ``reached=False``, zero cost and the reason in ``note`` instead of raising."""
    from onnx_basisprune.plan.ranks import block_size

    results = []
    for method in methods:
        try:
            if method in ("torch-pruning", "torch-pruning-round"):
                extra = {k: v for k, v in kwargs.items() if k not in ("global_sparsity", "constants_as_initializers")}
                round_to = block_size("cpu") if method == "torch-pruning-round" else None
                results += torch_pruning_taylor_sweep(model, calib, test, target_kind, targets, round_to=round_to, **extra)
            elif method in ("onnxsim-l2", "onnxsim-wanda"):
                extra = {k: v for k, v in kwargs.items() if k != "weights"}
                results += onnxsim_structured_sweep(model, calib, test, target_kind, targets,
                                                    method=method.split("-")[1], **extra)
            else:
                raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        except BaselineError as exc:
            for target in targets:
                results.append(BaselineResult(method, target_kind, target, 0, 0, 0, None, 0, 0.0, "", str(exc),
                                              reached=False))
            if kwargs.get("progress", True):
                print(f"{method:14s} skipped: {exc}", file=sys.stderr, flush=True)
    return results


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the ONNX model")
    parser.add_argument("--calib", type=Path, required=True, help="calibration image folder")
    parser.add_argument("--test", type=Path, help="test image folder (accuracy; omitted: not measured)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-macs", type=_fractions, help="fraction(s) of MACs that remain, e.g. 0.8,0.6,0.4")
    budget.add_argument("--target-params", type=_fractions, help="fraction(s) of params that remain")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--limit", type=int, default=2000, help="calibration images used (class-balanced; default 2000)")
    parser.add_argument("--test-limit", type=int, help="test images used (class-balanced subset; default all)")
    parser.add_argument("--weights", type=Path, help="PyTorch state_dict for torch-pruning (default MODEL.pth beside it)")
    parser.add_argument("--global-sparsity", action="store_true", help="onnxsim: global ranking of plain chains")
    parser.add_argument("--keep-constant-nodes", action="store_true",
                        help="onnxsim: prune the graph as given, without turning Constant nodes into initializers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"pruned models (default {DEFAULT_OUT})")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not args.model.is_file():
        parser.error(f"model not found: {args.model}")
    kind, targets = ("macs", args.target_macs) if args.target_macs else ("params", args.target_params)
    original = original_result(args.model, args.test, args.test_limit, args.seed)
    print(original.line(), file=sys.stderr, flush=True)
    results = run_baselines(args.model, args.calib, args.test, kind, targets, methods, limit=args.limit,
                            seed=args.seed, batch_size=args.batch_size, test_limit=args.test_limit,
                            out_dir=args.out_dir, weights=args.weights, global_sparsity=args.global_sparsity,
                            constants_as_initializers=not args.keep_constant_nodes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": str(args.model), "calib": str(args.calib), "test": str(args.test), "limit": args.limit,
                   "seed": args.seed, "original": original.to_json(), "results": [r.to_json() for r in results],
                   "versions": _versions()}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torch-pruning", "onnxsim", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
