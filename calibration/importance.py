"""Taylor importance of every basis scaling factor, measured in Torch on calibration data.

The decomposed model runs in Torch (:mod:`.interpreter`). Each basis output channel ``a_c`` is
multiplied by a scaling factor ``s_c = 1`` (the paper's basis scaling factor). With the loss of
sample ``n`` written ``L_n``, the per-sample derivative is

    g_nc = dL_n/ds_c = sum over positions of a_nc * dL_n/da_nc      (at s = 1),

obtained from one backward pass per batch via a tensor hook, so memory does not grow with the
calibration set: only running sums per channel are kept. From them come both criteria:

* ``taylor``    (Molchanov et al. 2016, the paper's):  |mean_n g_nc|
* ``taylor-sq`` (Molchanov et al. 2019):                mean_n g_nc^2

The loss is cross-entropy with the labels when the data is labeled and the output is a class-score
vector; cross-entropy against the model's own predictions when unlabeled; for outputs that are not
class scores, a random projection ``r . y`` per output, whose squared first-order change has the
expectation ``|dy|^2`` (so use ``taylor-sq`` there: the first-order form of a squared change is 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from onnx_basisprune.channels.refit import ConsumerInput

from .interpreter import OnnxTorchModule


@dataclass(frozen=True)
class Gate:
    """Where a layer's bases live in the decomposed graph: the basis output tensor, its channel
    axis, and the number of groups the channels are split into (grouped Conv)."""

    tensor: str
    axis: int
    groups: int = 1


@dataclass
class ImportanceResult:
    """Raw (not normalised) importances per layer, one value per basis channel, for both criteria."""

    taylor: dict[str, np.ndarray]
    taylor_sq: dict[str, np.ndarray]
    # Basis-output moments per layer: E[b b^T] (groups, r, r) and E[b] (groups, r).
    second: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]
    loss: str
    samples: int
    seconds: float
    device: str

    def by_criterion(self, criterion: str) -> dict[str, np.ndarray]:
        return self.taylor if criterion == "taylor" else self.taylor_sq


def choose_loss(output_shape: tuple[int, ...], labeled: bool) -> str:
    """'labels' / 'self' for class-score outputs (N, C), else 'projection'."""
    if len(output_shape) == 2 and output_shape[1] > 1:
        return "labels" if labeled else "self"
    return "projection"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class PassSettings:
    """How a forward/backward pass walks the calibration batches: the loss (:func:`choose_loss`),
    the number of batches expected (``total``: progress bar and row sampling rates), the Torch
    device (None: CUDA when available), the seed, and whether to show progress."""

    loss: str
    total: int | None = None
    device: str | None = None
    seed: int = 0
    progress: bool = True

    @property
    def on(self) -> str:
        """The device the pass runs on."""
        return self.device or default_device()


def _per_sample_rows(out: torch.Tensor) -> torch.Tensor:
    """An output as (samples, features); a scalar output is one row of one feature."""
    return out.reshape(out.shape[0], -1) if out.dim() else out.reshape(1, 1)


def _per_sample_loss(outputs: tuple[torch.Tensor, ...], loss: str, labels: torch.Tensor | None,
                     projections: list[torch.Tensor]) -> torch.Tensor:
    """Sum over the batch of per-sample losses (so dL/ds per sample is recoverable)."""
    if loss == "projection":
        return sum((_per_sample_rows(out) @ r).sum() for out, r in zip(outputs, projections))
    logits = outputs[0].float()
    target = labels if loss == "labels" else logits.argmax(dim=1).detach()
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum")


def _taylor_batches(
    module: OnnxTorchModule,
    sites: Mapping[str, int],
    batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray | None]],
    settings: PassSettings,
    *,
    on_forward: Callable[[str, torch.Tensor], None] | None = None,
    observe: Iterable[str] = (),
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """For each batch: per-sample ``s * dL_n/ds_c`` (float64, (N, channels)) of a gate ``s = 1``
    on every channel of every site tensor (name -> channel axis), and the batch size.
    ``on_forward(name, tensor)`` sees each site tensor, and each ``observe`` tensor, as it is
    computed."""
    module = module.to(settings.on).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    per_sample: dict[str, torch.Tensor] = {}

    def make_hook(name: str, axis: int | None):
        def hook(x: torch.Tensor) -> torch.Tensor:
            if on_forward is not None:
                on_forward(name, x)
            if axis is None:
                return x
            channel = axis % x.dim()
            # The hook must not hold ``x`` itself: x -> grad_fn -> hook -> x is a cycle through
            # autograd's C++ graph that Python's collector cannot break, and every batch's
            # activations would stay in memory. The detached view shares the storage only.
            value = x.detach()

            def on_grad(grad: torch.Tensor) -> None:
                dims = [d for d in range(value.dim()) if d not in (0, channel)]
                g = (value * grad).sum(dim=dims) if dims else value * grad
                per_sample[name] = g.reshape(value.shape[0], -1).double()  # (N, channels)

            x.register_hook(on_grad)
            return x

        return hook

    hooks = {name: make_hook(name, None) for name in observe} | {name: make_hook(name, axis) for name, axis in sites.items()}
    for n in backward_passes(module, batches, hooks, settings, desc="importance"):
        yield dict(per_sample), n
        per_sample.clear()


def backward_passes(
    module: OnnxTorchModule,
    batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray | None]],
    hooks: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    settings: PassSettings,
    desc: str,
) -> Iterator[int]:
    """For each batch: forward through ``hooks``, the summed per-sample loss, backward; yields the
    batch size once the hooks have seen the gradients. Float inputs require grad so every
    intermediate tensor does, while the weights stay frozen."""
    device, loss = settings.on, settings.loss
    generator = torch.Generator().manual_seed(settings.seed)
    projections: list[torch.Tensor] = []
    for inputs, labels in tqdm(batches, total=settings.total, desc=desc, unit="batch", disable=not settings.progress):
        feeds = {k: _leaf(v, device) for k, v in inputs.items()}
        outputs = module(**feeds, hooks=hooks)
        if loss == "projection" and not projections:
            projections = [torch.randn(_per_sample_rows(o).shape[1], generator=generator).to(device, o.dtype) for o in outputs]
        y = None if labels is None else torch.from_numpy(labels).to(device)
        _per_sample_loss(outputs, loss, y, projections).backward()
        yield next(iter(inputs.values())).shape[0]


def measure_importance(
    module: OnnxTorchModule,
    gates: Mapping[str, Gate],
    batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray | None]],
    settings: PassSettings,
) -> ImportanceResult:
    """Accumulate per-channel Taylor statistics of every gate over ``batches``, and the moments
    of the gated (basis output) tensors."""
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    layer_of = {gate.tensor: name for name, gate in gates.items()}
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    outer: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    positions: dict[str, int] = {}

    def accumulate_moments(tensor: str, x: torch.Tensor) -> None:
        name = layer_of[tensor]
        gate = gates[name]
        b = x.detach().movedim(gate.axis % x.dim(), -1).reshape(-1, x.shape[gate.axis])  # (samples*positions, C)
        b = b.reshape(len(b), gate.groups, -1).transpose(0, 1).double()  # (g, M, r)
        outer[name] = outer.get(name, 0) + b.transpose(1, 2) @ b
        first[name] = first.get(name, 0) + b.sum(dim=1)
        positions[name] = positions.get(name, 0) + b.shape[1]

    samples = 0
    sites = {gate.tensor: gate.axis for gate in gates.values()}
    for per_sample, n in _taylor_batches(module, sites, batches, settings, on_forward=accumulate_moments):
        for tensor, g in per_sample.items():  # a basis that does not reach the loss has no gradient
            name = layer_of[tensor]
            sums[name] = sums.get(name, 0) + g.sum(dim=0)
            squares[name] = squares.get(name, 0) + (g**2).sum(dim=0)
        samples += n
    if samples == 0:
        raise ValueError("no calibration samples to measure importance on")
    taylor = {n: (s.abs() / samples).cpu().numpy() for n, s in sums.items()}
    taylor_sq = {n: (s / samples).cpu().numpy() for n, s in squares.items()}
    second = {n: (o / positions[n]).cpu().numpy() for n, o in outer.items()}
    mean = {n: (f / positions[n]).cpu().numpy() for n, f in first.items()}
    return ImportanceResult(taylor, taylor_sq, second, mean, settings.loss, samples, time.perf_counter() - start, settings.on)


@dataclass(frozen=True)
class ChannelSite:
    """A tensor whose channels carry a gate: ``groups[c]`` is the channel group of channel ``c``
    (-1: not gated). A group's gate multiplies all its channels at all its sites."""

    tensor: str
    axis: int
    groups: np.ndarray


@dataclass
class ChannelImportance:
    """Taylor importance of zeroing each channel group (one gate shared by all its channels),
    and the input moments of the layers that will be refitted after a removal."""

    taylor: np.ndarray  # (groups,) |mean_n dL_n/ds|
    taylor_sq: np.ndarray  # (groups,) mean_n (dL_n/ds)^2
    moments: dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (E[x x^T] (D, D), E[x] (D,))
    loss: str
    samples: int
    seconds: float
    device: str

    def by_criterion(self, criterion: str) -> np.ndarray:
        return self.taylor if criterion == "taylor" else self.taylor_sq


def measure_channel_importance(
    module: OnnxTorchModule,
    sites: Sequence[ChannelSite],
    n_groups: int,
    batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray | None]],
    settings: PassSettings,
    *,
    consumers: Sequence[ConsumerInput] = (),
    rows_per_input: int = 64,
) -> ChannelImportance:
    """Per-sample derivative of the loss by each group's gate, summed over the group's channels
    at every site (the chain rule for one gate used in many places), then both criteria.

    In the same pass, the input moments of every layer in ``consumers``: im2col rows for a Conv,
    feature vectors for Gemm/MatMul, about ``rows_per_input`` rows per input dimension D in all
    (drawn at random per batch, seeded; at least 256 per batch): plenty for D x D moments, and it
    bounds the cost of large feature maps (the D^2 products dominate the pass otherwise)."""
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    index = {site.tensor: torch.from_numpy(np.asarray(site.groups, dtype=np.int64)) for site in sites}
    sums = torch.zeros(n_groups, dtype=torch.float64)
    squares = torch.zeros(n_groups, dtype=torch.float64)
    samples = 0
    axes = {site.tensor: site.axis for site in sites}
    readers: dict[str, list[ConsumerInput]] = {}
    for spec in consumers:
        readers.setdefault(spec.tensor, []).append(spec)
    batches_expected = settings.total or 64
    moments = _Moments({spec.node: max(256, -(-rows_per_input * spec.size // batches_expected)) for spec in consumers},
                       settings.seed)

    def on_forward(tensor: str, x: torch.Tensor) -> None:
        for spec in readers.get(tensor, ()):
            moments.add(spec.node, _input_rows(spec, x.detach()))

    for per_sample, n in _taylor_batches(module, axes, batches, settings, on_forward=on_forward, observe=readers):
        contribution = torch.zeros(n, n_groups + 1, dtype=torch.float64)  # last column: ungated channels
        for tensor, g in per_sample.items():
            groups = index[tensor].clone()
            groups[groups < 0] = n_groups
            contribution.index_add_(1, groups, g.cpu())
        contribution = contribution[:, :n_groups]
        sums += contribution.sum(dim=0)
        squares += (contribution**2).sum(dim=0)
        samples += n
    if samples == 0:
        raise ValueError("no calibration samples to measure importance on")
    return ChannelImportance((sums.abs() / samples).numpy(), (squares / samples).numpy(), moments.result(), settings.loss,
                             samples, time.perf_counter() - start, settings.on)


def _input_rows(spec: ConsumerInput, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of its weight's columns: im2col patches (channel-major, as the
    weight is laid out) for a 2-D Conv, else the feature vectors of the last axis."""
    if spec.kernel is None:
        return x.reshape(-1, x.shape[-1])
    top, left, bottom, right = spec.pads
    padded = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(padded, spec.kernel, dilation=spec.dilations, stride=spec.strides)  # (N, D, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Moments:
    """Running E[x x^T] and E[x] per layer over rows subsampled at random (at most
    ``max_rows[layer]`` per batch), in float64."""

    def __init__(self, max_rows: Mapping[str, int], seed: int):
        self.max_rows = dict(max_rows)
        self.generator = torch.Generator().manual_seed(seed)
        self.sums: dict[str, list] = {}

    def add(self, name: str, rows: torch.Tensor) -> None:
        cap = self.max_rows.get(name, len(rows))
        if len(rows) > cap:
            pick = torch.randperm(len(rows), generator=self.generator)[:cap].to(rows.device)
            rows = rows[pick]
        rows = rows.double()
        entry = self.sums.setdefault(name, [0, 0, 0])
        entry[0] = entry[0] + rows.T @ rows
        entry[1] = entry[1] + rows.sum(dim=0)
        entry[2] += len(rows)

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {name: ((s / n).cpu().numpy(), (m / n).cpu().numpy()) for name, (s, m, n) in self.sums.items()}


def _leaf(array: np.ndarray, device: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return t.requires_grad_(True) if t.is_floating_point() else t
