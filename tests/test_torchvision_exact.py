"""The full-rank split reproduces real architectures: torchvision models with random weights
(BatchNorm statistics randomised so folding is really tested), exported by the TorchScript
exporter (opset 13 and 17) and the dynamo exporter (opset 18), then decomposed and compared
with onnxruntime. Also the real models in ../shared/models.

By default a representative subset runs; ``pytest -m slow`` runs every architecture with every
exporter.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import onnx
import pytest
from conftest import assert_same_outputs, random_feeds, shared_model

from onnx_basisprune import decompose

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

TOL = 1e-4
BATCH = 2

# arch -> (constructor kwargs, input size)
ARCHS: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "vgg11_bn": ({}, 32),  # CIFAR-style head at 32 px, see _build
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "densenet121": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "squeezenet1_0": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "convnext_tiny": ({}, 64),
    "mnasnet0_5": ({}, 64),
}
EXPORTERS = ("ts13", "ts17", "dynamo18")

# The default subset: every exporter, the main layer kinds (plain, bottleneck, depthwise + SE,
# grouped, concatenations, Gemm classifiers, LayerNorm + MatMul), in about two minutes.
DEFAULT = {
    ("resnet18", "ts13"),
    ("mobilenet_v2", "ts17"),
    ("googlenet", "dynamo18"),
    ("efficientnet_b0", "dynamo18"),
    ("shufflenet_v2_x0_5", "ts17"),
    ("regnet_x_400mf", "dynamo18"),
    ("squeezenet1_0", "ts13"),
}


def _build(arch: str) -> torch.nn.Module:
    kwargs, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    if arch.startswith("vgg"):
        # At 32 px the features end at 1x1, and the TorchScript exporter cannot export the 1x1 -> 7x7
        # AdaptiveAvgPool2d; use the CIFAR-style head (global pool, Linear(512, 4096)). Still Flatten -> Gemm.
        model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        model.classifier[0] = torch.nn.Linear(512, 4096)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=generator))
                if module.affine:
                    module.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=generator))
                    module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


def export(arch: str, exporter: str, path: Path) -> Path:
    """Export ``arch`` with random weights to ``path`` (dynamic batch for TorchScript)."""
    model = _build(arch)
    size = ARCHS[arch][1]
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter.startswith("ts"):
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=int(exporter[2:]),
                              input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        else:
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=int(exporter[6:]),
                                        input_names=["input"], output_names=["logits"], verbose=False)
            program.save(str(path))
    return path


def unfolded_batchnorms(model: onnx.ModelProto) -> list[str]:
    """BatchNormalization nodes that follow a Conv/Gemm they could have been folded into (a BN
    after a Concat or a graph input, as in DenseNet's pre-activation blocks, has no such Conv)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return [
        node.name for node in model.graph.node
        if node.op_type == "BatchNormalization" and node.input[0] in producers
        and producers[node.input[0]].op_type in ("Conv", "Gemm") and uses[node.input[0]] == 1
    ]


def check_exact(src: Path | str, tmp_path: Path) -> dict:
    """Decompose at full rank and compare with the original on random inputs; returns a summary."""
    start = time.perf_counter()
    result = decompose(src)
    seconds = time.perf_counter() - start
    actions = [layer.action for layer in result.layers]
    assert set(actions) <= {"decomposed", "skipped"}, actions
    assert "decomposed" in actions
    for layer in result.layers:
        if layer.action == "skipped":
            assert layer.reason, layer
    out_path = tmp_path / "decomposed.onnx"
    result.save(out_path)
    model = onnx.load(str(out_path))
    onnx.checker.check_model(model, full_check=True)
    assert not unfolded_batchnorms(model)
    error = assert_same_outputs(src, out_path, feeds=random_feeds(src, batch=BATCH), tol=TOL)
    return {"decomposed": actions.count("decomposed"), "skipped": actions.count("skipped"), "error": error, "seconds": seconds}


def _cases(subset: bool):
    cases = []
    for arch in ARCHS:
        for exporter in EXPORTERS:
            if ((arch, exporter) in DEFAULT) == subset:
                marks = () if subset else (pytest.mark.slow,)
                cases.append(pytest.param(arch, exporter, id=f"{arch}-{exporter}", marks=marks))
    return cases


@pytest.mark.parametrize("arch,exporter", _cases(subset=True) + _cases(subset=False))
def test_torchvision_full_rank_is_exact(tmp_path, arch, exporter, record_property):
    path = export(arch, exporter, tmp_path / f"{arch}-{exporter}.onnx")
    summary = check_exact(path, tmp_path)
    for key, value in summary.items():
        record_property(key, value)


@pytest.mark.parametrize("name", ["resnet20_cifar10.onnx", "resnet56_cifar10.onnx", "efficientnet_lite0_imagenet.onnx"])
def test_shared_models_full_rank_is_exact(shared_dir, tmp_path, name):
    src = shared_model(shared_dir, name)
    summary = check_exact(src, tmp_path)
    if name.startswith("efficientnet"):
        assert summary["skipped"] == 16  # the depthwise Conv
