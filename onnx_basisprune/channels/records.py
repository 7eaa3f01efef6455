"""The records the channel analysis is made of: the channel elements of a tensor
(:class:`Tensor`), the zero/non-zero status transfer of an op (:class:`Transfer`), which elements
survive a removal (:class:`Kept`), and the constant and attribute edits a removal needs
(:class:`SliceEdit`, :class:`ValueEdit`, :class:`AttrEdit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


class Unsupported(Exception):
    """An op the analysis cannot prove safe: its tensors' groups become unprunable."""


def prod(dims: Iterable[int]) -> int:
    return int(math.prod(int(d) for d in dims))


@dataclass
class Tensor:
    name: str
    index: int  # position in the plan's tensor list
    axis: int  # channel axis (non-negative)
    rank: int
    size: int  # elements along the channel axis
    offset: int  # id of the first element
    dtype: ir.DataType | None

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.offset, self.offset + self.size)


@dataclass
class Transfer:
    """How the zero/non-zero status of a tensor's elements follows from its inputs when gates are
    0: ``fresh`` (producer rows), ``or`` (zero iff all sources zero and no ``create``), ``and``
    (zero iff any source zero). ``sources``: (tensor, source element position per output
    element, -1 for none)."""

    out: str
    kind: str
    sources: list[tuple[str, np.ndarray]]
    create: np.ndarray | None = None


class Kept:
    """Which elements survive a removal: positions per tensor."""

    def __init__(self, tensors: Mapping[str, Tensor], keep: np.ndarray):
        self.tensors, self.keep = tensors, keep

    def mask(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self.keep[t.offset : t.offset + t.size]

    def idx(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.mask(name))

    def count(self, name: str) -> int:
        return int(self.mask(name).sum())


@dataclass
class SliceEdit:
    """Keep, along each listed axis of a constant input, the positions of one tensor's kept elements."""

    node: str
    index: int
    axes: tuple[tuple[int, str], ...]  # (constant axis, tensor whose elements run along it)
    shape: tuple[int, ...]

    def compute(self, array: np.ndarray, kept: Kept) -> np.ndarray | None:
        out, changed = array, False
        for axis, tensor in self.axes:
            idx = kept.idx(tensor)
            if len(idx) != out.shape[axis]:
                out, changed = np.take(out, idx, axis=axis), True
        return out if changed else None


@dataclass
class ValueEdit:
    """Recompute a small integer constant input (pads, starts, split sizes, reshape target, sizes);
    ``original`` is None when the input is absent and gets added."""

    node: str
    index: int
    fn: Callable[[np.ndarray | None, Kept], np.ndarray | None]
    original: np.ndarray | None

    def compute(self, array: np.ndarray | None, kept: Kept) -> np.ndarray | None:
        return self.fn(array, kept)


@dataclass
class AttrEdit:
    """Attributes to set on a node (None value: remove the attribute)."""

    node: str
    fn: Callable[[Kept], dict[str, ir.Attr | None]]
