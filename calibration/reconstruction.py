"""The Torch passes behind data-aware reconstruction: layer statistics and the sequential fit.

:func:`layer_statistics` runs the original model once over the calibration data, forward and
backward, and returns per layer the moments of its input (im2col rows for a 2-D Conv, feature
vectors for Gemm/MatMul) and the loss sensitivity of each output channel,
``E_n[sum over positions (dL_n/dy_c)^2]`` (the diagonal Fisher weight of that output): what the
allocation of ranks across layers needs.

:func:`sequential_fit` then walks the graph node by node in execution order over all
calibration batches at once, keeping two environments per batch: the original model's tensors
and the tensors of the model *as pruned so far* (shared while they are equal). At each layer to
fit, the moments of its input in both (``E[x_p x_p^T]``, ``E[x_o x_p^T]``, on the same sampled
positions) go to ``fit`` (numpy, graph side), whose weights replace the layer's in the pruned
environment before the walk goes on: each layer is fitted on the inputs the pruned model really
produces (the loop of SparseGPT / OBC, on an ONNX graph). A layer whose output is added to a
branch (``LayerSite.branch``, a residual block's shortcut) also gets the moments of that branch's
error, original minus pruned, at the same positions, so its fit makes up for it. Memory holds the live tensors of the
calibration set (the graph's frontier) twice, not the whole activation history.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from onnx_basisprune.channels.refit import ConsumerInput
from onnx_basisprune.basis.reconstruct import InputMoments

from .importance import PassSettings, _input_rows, backward_passes, default_device
from .interpreter import OnnxTorchModule

Batches = Iterable[tuple[dict[str, np.ndarray], np.ndarray | None]]


@dataclass(frozen=True)
class LayerSite:
    """Where a layer lives in the graph: how it reads its input, its output tensor, the channel
    axis of that output, and the tensor its output alone is added to (None: none)."""

    read: ConsumerInput
    output: str
    axis: int
    branch: str | None = None


@dataclass(frozen=True)
class LayerStatistics:
    """What the statistics pass measured per layer (node name): input moments and the Fisher
    weight (C_out,) of each output channel."""

    moments: dict[str, InputMoments]
    fisher: dict[str, np.ndarray]
    loss: str
    samples: int
    seconds: float
    device: str


# Rows sampled per layer in all, at least: a small layer's moments then cost little more and its
# fit generalises better than from ``rows_per_input`` rows per input dimension alone.
MIN_ROWS = 65536


def _row_cap(read: ConsumerInput, rows_per_input: int, batches: int) -> int:
    """Rows sampled per batch: about ``rows_per_input`` per input dimension and at least
    :data:`MIN_ROWS` in all."""
    return -(-max(rows_per_input * read.size, MIN_ROWS) // max(batches, 1))


class _MomentSums:
    """Running sums for one layer's :class:`InputMoments`, in float64."""

    def __init__(self, read: ConsumerInput):
        self.read = read
        self.gram = self.cross = self.sum_p = self.sum_o = 0
        self.branch_cross = self.branch_sum = None
        self.rows = 0

    def add(self, rows_p: torch.Tensor, rows_o: torch.Tensor, branch_error: torch.Tensor | None = None) -> None:
        """One batch of paired rows (M, groups * d), and the branch error at the same positions
        (M, C_out) where there is one. The products of one batch are taken in float32 (a batch
        holds a few thousand rows at most), the running sums in float64."""
        g, d = self.read.groups, self.read.size
        p = rows_p.float().reshape(len(rows_p), g, d).transpose(0, 1)  # (g, M, d)
        o = p if rows_o is rows_p else rows_o.float().reshape(len(rows_o), g, d).transpose(0, 1)
        gram = (p.transpose(1, 2) @ p).double()
        self.gram = self.gram + gram
        self.cross = self.cross + (gram if o is p else (o.transpose(1, 2) @ p).double())
        self.sum_p = self.sum_p + p.sum(dim=1, dtype=torch.float64)
        self.sum_o = self.sum_o + o.sum(dim=1, dtype=torch.float64)
        if branch_error is not None:
            e = branch_error.float().reshape(len(branch_error), g, -1).transpose(0, 1)  # (g, M, out_g)
            cross = (e.transpose(1, 2) @ p).double()
            total = e.sum(dim=1, dtype=torch.float64)
            self.branch_cross = cross if self.branch_cross is None else self.branch_cross + cross
            self.branch_sum = total if self.branch_sum is None else self.branch_sum + total
        self.rows += p.shape[1]

    def result(self) -> InputMoments:
        n = max(self.rows, 1)
        as_np = lambda t: None if t is None else (t / n).cpu().numpy()  # noqa: E731
        return InputMoments(as_np(self.gram), as_np(self.cross), as_np(self.sum_p), as_np(self.sum_o), self.rows,
                            as_np(self.branch_cross), as_np(self.branch_sum))


def _output_positions(read: ConsumerInput, shape: torch.Size) -> tuple[int, ...]:
    """(N, OH, OW) output positions of a 2-D Conv on an input of ``shape``; (rows,) otherwise."""
    if read.kernel is None:
        return (int(np.prod(shape[:-1])),)
    top, left, bottom, right = read.pads
    sizes = (shape[2] + top + bottom, shape[3] + left + right)
    out = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(sizes, read.kernel, read.strides, read.dilations)]
    return (shape[0], *out)


def sampled_rows(read: ConsumerInput, tensors: Sequence[torch.Tensor], cap: int, generator: torch.Generator,
                 outputs: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """The layer's input rows (im2col patches, channel-major like the weight, or feature vectors)
    at the same at most ``cap`` random output positions of each tensor (all when fewer), then
    the rows (M, C) of each of ``outputs`` (tensors shaped like the layer's output) at those
    positions. Only the sampled patches are gathered, never the whole im2col matrix."""
    grid = _output_positions(read, tensors[0].shape)
    total = int(np.prod(grid))
    pick = None if total <= cap else torch.randperm(total, generator=generator)[:cap]
    return _input_sample(read, tensors, grid, pick) + [_output_sample(read, y, pick) for y in outputs]


def _output_sample(read: ConsumerInput, y: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    """Rows (M, C) of a tensor shaped like the layer's output at the picked positions (all: None)."""
    rows = y.reshape(-1, y.shape[-1]) if read.kernel is None else y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return rows if pick is None else rows[pick.to(rows.device)]


def _input_sample(read: ConsumerInput, tensors: Sequence[torch.Tensor], grid: tuple[int, ...],
                  pick: torch.Tensor | None) -> list[torch.Tensor]:
    if read.kernel is None:
        flat = [x.reshape(-1, x.shape[-1]) for x in tensors]
        return flat if pick is None else [f[pick.to(f.device)] for f in flat]
    if pick is None:
        return [_input_rows(read, x) for x in tensors]
    device = tensors[0].device
    pick = pick.to(device)
    n, rest = pick // (grid[1] * grid[2]), pick % (grid[1] * grid[2])
    (kh, kw), (sh, sw), (dh, dw) = read.kernel, read.strides, read.dilations
    rows = (rest // grid[2])[:, None] * sh + torch.arange(kh, device=device) * dh  # (M, kh)
    cols = (rest % grid[2])[:, None] * sw + torch.arange(kw, device=device) * dw  # (M, kw)
    top, left, bottom, right = read.pads
    out = []
    for x in tensors:
        padded = F.pad(x, (left, right, top, bottom))
        patches = padded[n[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (M, kh, kw, C)
        out.append(patches.permute(0, 3, 1, 2).reshape(len(pick), -1))
    return out


def layer_statistics(
    module: OnnxTorchModule,
    sites: Mapping[str, LayerSite],
    batches: Batches,
    settings: PassSettings,
    *,
    rows_per_input: int = 16,
) -> LayerStatistics:
    """Input moments and output Fisher weights of every layer in ``sites`` on the original model,
    in one forward and backward pass per batch (running sums only: memory does not grow with the
    number of samples)."""
    device = settings.on
    start = time.perf_counter()
    module = module.to(device).eval()
    generator = torch.Generator().manual_seed(settings.seed)
    sums = {name: _MomentSums(site.read) for name, site in sites.items()}
    fisher: dict[str, torch.Tensor] = {}
    readers: dict[str, list[str]] = {}
    writers: dict[str, list[str]] = {}
    for name, site in sites.items():
        readers.setdefault(site.read.tensor, []).append(name)
        writers.setdefault(site.output, []).append(name)
    n_batches = settings.total or 64

    def hook_for(tensor: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(x: torch.Tensor) -> torch.Tensor:
            for name in readers.get(tensor, ()):
                read = sites[name].read
                (rows,) = sampled_rows(read, [x.detach()], _row_cap(read, rows_per_input, n_batches), generator)
                sums[name].add(rows, rows)
            if tensor in writers and x.requires_grad:
                def on_grad(grad: torch.Tensor) -> None:
                    for name in writers[tensor]:
                        axis = sites[name].axis % grad.dim()
                        dims = [d for d in range(grad.dim()) if d != axis]
                        sq = (grad.double() ** 2).sum(dim=dims)
                        fisher[name] = fisher.get(name, 0) + sq

                x.register_hook(on_grad)
            return x

        return hook

    hooks = {tensor: hook_for(tensor) for tensor in set(readers) | set(writers)}
    for p in module.parameters():
        p.requires_grad_(False)
    samples = 0
    for n in backward_passes(module, batches, hooks, settings, desc="statistics"):
        samples += n
    if samples == 0:
        raise ValueError("no calibration samples to measure statistics on")
    moments = {name: s.result() for name, s in sums.items()}
    weights = {}
    for name, site in sites.items():
        f = fisher.get(name)
        weights[name] = np.zeros(1) if f is None else (f / samples).cpu().numpy()
    return LayerStatistics(moments, weights, settings.loss, samples, time.perf_counter() - start, device)


Fit = Callable[[str, InputMoments], tuple[np.ndarray, np.ndarray | None]]


def sequential_fit(
    module: OnnxTorchModule,
    sites: Mapping[str, LayerSite],
    fit: Fit,
    batches: Batches,
    *,
    refit_unchanged: frozenset[str] = frozenset(),
    gates: Mapping[str, tuple[int, np.ndarray]] | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    rows_per_input: int = 16,
) -> None:
    """Walk the graph once over all ``batches``; at each layer of ``sites`` whose input differs
    from the original's (or that is in ``refit_unchanged``: its rank is cut), call
    ``fit(name, moments)`` for the layer's new (weight, bias) in its node layout and use them in
    the pruned model from there on. ``gates`` (tensor name -> (channel axis, one multiplier per
    channel)) scale tensors of the pruned model as they are produced: 0 for the channels that
    channel pruning removes. ``fit`` keeps what it needs; nothing is returned."""
    device = device or default_device()
    module = module.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    hooks = {name: _gate(axis, mask, device) for name, (axis, mask) in (gates or {}).items()}
    data = list(batches)
    originals = [module.initial_env(**{k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()})
                 for inputs, _ in data]
    pruned = [dict(env) for env in originals]
    diverged: set[str] = set()
    with torch.no_grad():
        for step in tqdm(module.steps, desc="reconstruction", unit="node", disable=not progress):
            site = sites.get(step.node)
            changed = any(name in diverged for name in step.inputs if name)
            if site is not None and (changed or step.node in refit_unchanged or site.branch in diverged):
                replace = _fitted_inputs(site, step.node, fit, originals, pruned, rows_per_input, generator, device,
                                         dtype=pruned[0][step.inputs[1]].dtype)
                for env in originals:
                    module.run_step(step, env)
                for env in pruned:
                    module.run_step(step, env, hooks, replace=replace)
                diverged.update(name for name in step.outputs if name)
            elif changed or any(name in hooks for name in step.outputs):
                for env in originals:
                    module.run_step(step, env)
                for env in pruned:
                    module.run_step(step, env, hooks)
                diverged.update(name for name in step.outputs if name)
            else:
                for orig, env in zip(originals, pruned):
                    module.run_step(step, orig)
                    for name in step.outputs:
                        if name:
                            env[name] = orig[name]
                    for name in step.release:
                        env.pop(name, None)


def _gate(axis: int, mask: np.ndarray, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multiply a tensor by ``mask`` along its channel ``axis``."""
    values = torch.as_tensor(np.asarray(mask), device=device)

    def gate(x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[axis] = -1
        return x * values.to(x.dtype).reshape(shape)

    return gate


def _fitted_inputs(site: LayerSite, name: str, fit: Fit, originals: list[dict], pruned: list[dict],
                   rows_per_input: int, generator: torch.Generator, device: str, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Moments of the layer's input in both environments, the fit, and the new weight (input 1)
    and bias (input 2) as tensors."""
    sums = _MomentSums(site.read)
    cap = _row_cap(site.read, rows_per_input, len(pruned))
    for orig, env in zip(originals, pruned):
        x_p, x_o = env[site.read.tensor], orig[site.read.tensor]
        s_p, s_o = (env.get(site.branch), orig.get(site.branch)) if site.branch else (None, None)
        errors = [s_o - s_p] if s_p is not None and s_o is not None and s_p is not s_o else []
        if x_o is x_p:
            rows_p, *error = sampled_rows(site.read, [x_p], cap, generator, errors)
            sums.add(rows_p, rows_p, *error)
        else:
            sums.add(*sampled_rows(site.read, [x_p, x_o], cap, generator, errors))
    weight, bias = fit(name, sums.result())
    replace = {1: torch.from_numpy(weight).to(device, dtype)}
    if bias is not None:
        replace[2] = torch.from_numpy(bias).to(device, dtype)
    return replace
