"""Scaling-factor tuning (the paper's own mechanism): after the closed-form fit, learn one factor
per kept basis and one bias per output channel of every refitted layer, nothing else, so that the
pruned model's outputs match the original model's on the calibration images (no labels needed).

The pruned model runs in Torch (:mod:`.interpreter`); each basis output tensor is multiplied by
its factors ``s`` (start 1) and each refitted layer's output gets ``+ b`` (start 0) through the
interpreter's tensor hooks, so no weight is a parameter. The loss is the KL divergence from the
original's softmax for class scores, else the mean squared error of the outputs. A few hundred
Adam steps on random mini-batches; the factors then fold into the scaling weights and biases.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .interpreter import OnnxTorchModule


@dataclass(frozen=True)
class TuningSite:
    """A tensor whose channels (on ``axis``) get a learned factor (``kind="scale"``) or bias
    (``kind="bias"``)."""

    layer: str
    tensor: str
    axis: int
    channels: int
    kind: str


@dataclass(frozen=True)
class TuningResult:
    scales: dict[str, np.ndarray]  # layer -> factor per basis channel
    biases: dict[str, np.ndarray]  # layer -> bias change per output channel
    loss_before: float
    loss_after: float
    steps: int
    seconds: float


def _broadcast(values: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return values.view(shape)


def _distance(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], classes: bool) -> torch.Tensor:
    if classes:
        return F.kl_div(F.log_softmax(student[0].float(), dim=1), F.log_softmax(teacher[0].float(), dim=1),
                        log_target=True, reduction="batchmean")
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher))


def tune(
    module: OnnxTorchModule,
    teacher: OnnxTorchModule,
    sites: Sequence[TuningSite],
    inputs: Mapping[str, np.ndarray],
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> TuningResult:
    """Learn the factors and biases of ``sites`` in ``module`` (the pruned model) so that its
    outputs match ``teacher`` (the original) on ``inputs`` (name -> array, all samples)."""
    start = time.perf_counter()
    module, teacher = module.to(device).eval(), teacher.to(device).eval()
    for p in list(module.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    data = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}
    n = len(next(iter(data.values())))
    with torch.no_grad():
        targets = [torch.cat(parts) for parts in zip(*(teacher(**{k: v[i:i + batch_size] for k, v in data.items()})
                                                       for i in range(0, n, batch_size)))]
    classes = len(targets) == 1 and targets[0].dim() == 2 and targets[0].shape[1] > 1
    params = {site: torch.nn.Parameter(torch.ones(site.channels, device=device) if site.kind == "scale"
                                       else torch.zeros(site.channels, device=device)) for site in sites}

    def hook_for(site: TuningSite):
        value = params[site]
        if site.kind == "scale":
            return lambda x: x * _broadcast(value, x, site.axis).to(x.dtype)
        return lambda x: x + _broadcast(value, x, site.axis).to(x.dtype)

    hooks = {site.tensor: hook_for(site) for site in sites}

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        outputs = module(**{k: v[idx] for k, v in data.items()}, hooks=hooks)
        return _distance(outputs, [t[idx] for t in targets], classes)

    def full_loss() -> float:
        with torch.no_grad():
            parts = [loss_on(torch.arange(i, min(i + batch_size, n))) * min(batch_size, n - i) for i in range(0, n, batch_size)]
        return float(sum(parts) / n)

    before = full_loss()
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="tuning", unit="step", disable=not progress):
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        optimizer.zero_grad()
        loss_on(idx).backward()
        optimizer.step()
    after = full_loss()
    if not after < before:  # the steps did not help on the whole set: keep the closed-form fit
        with torch.no_grad():
            for site, value in params.items():
                value.fill_(1.0 if site.kind == "scale" else 0.0)
        after = before
    scales = {s.layer: params[s].detach().cpu().double().numpy() for s in sites if s.kind == "scale"}
    biases = {s.layer: params[s].detach().cpu().double().numpy() for s in sites if s.kind == "bias"}
    return TuningResult(scales, biases, before, after, steps, time.perf_counter() - start)
