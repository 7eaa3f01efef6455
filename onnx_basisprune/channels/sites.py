"""Gate sites: the tensors where a 0/1 mask per channel is multiplied in, so that the gated
model computes exactly what the model with the gated-off groups removed computes.

Producer outputs are sites. With their gates at 0, the status of every element (zero or not, and
where a non-zero value comes from) follows the walk's :class:`~.walk.Transfer` records; a
removed channel that turns non-zero before a consumer reads it (an unfolded BatchNormalization,
a depthwise Conv with bias, ...) makes its origin a site too, until there is no such channel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .cost import Plan
from .records import Transfer
from .walk import Walker


@dataclass(frozen=True, eq=False)
class GateSite:
    """A tensor of the normalised model where a per-channel mask multiplies the activation."""

    tensor: str
    axis: int  # channel axis of that tensor (non-negative)
    groups: np.ndarray  # (channels,) group index of each channel, -1 where unprunable


def choose_sites(walk: Walker, plan: Plan) -> list[GateSite]:
    """Producer outputs, then tensors where a removed channel turns non-zero before a consumer
    reads it: add the origins of such violations until there are none, then drop the added
    sites that the others make unnecessary (latest first)."""
    prunable_el = plan.prunable[plan.element_group]
    producers = {name for _, name in walk.producer_rows if prunable_el[walk.tensors[name].ids].any()}
    sites = set(producers)
    while True:
        status, origin = _propagate(walk, sites)
        new = _violations(walk, status, origin, prunable_el, walk.sinks) - sites
        if not new:
            break
        sites |= new
    position = {tr.out: i for i, tr in enumerate(walk.transfers)}
    sinks = set(walk.sinks)
    for name in sorted(sites - producers, key=lambda n: -walk.tensors[n].index):
        if not _needed(walk, name, sites, status, position[name], prunable_el, sinks):
            sites.discard(name)
            status, _ = _propagate(walk, sites)
    return [GateSite(name, t.axis, plan.public_groups(name)) for name, t in walk.tensors.items() if name in sites]


def _step(walk: Walker, tr: Transfer, status: np.ndarray, origin: np.ndarray, gated: bool) -> tuple[np.ndarray, np.ndarray]:
    """Status and origin of one transfer's output elements (zero everywhere when gated)."""
    t = walk.tensors[tr.out]
    if gated:
        return np.zeros(t.size, dtype=bool), np.full(t.size, -1)
    if tr.kind == "fresh":
        return np.ones(t.size, dtype=bool), np.full(t.size, t.index)
    parts = []
    for name, src in tr.sources:
        s = walk.tensors[name]
        ids = s.offset + np.maximum(src, 0)
        parts.append((status[ids] & (src >= 0), origin[ids]))
    if tr.kind == "and":  # zero when any operand is: blame the earliest origin
        st = np.logical_and.reduce([p for p, _ in parts])
        return st, np.where(st, np.min([o for _, o in parts], axis=0), -1)
    st = np.zeros(t.size, dtype=bool) if tr.create is None else tr.create.copy()
    org = np.where(st, t.index, -1)
    for s_st, s_org in parts:
        org = np.where(s_st & ~st, s_org, org)
        org = np.where(s_st & st & (org != s_org), t.index, org)
        st = st | s_st
    return st, org


def _propagate(walk: Walker, sites: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Zero/non-zero status (and where non-zero values come from) of every element when the
    gates at ``sites`` are 0 for the removed groups."""
    status = np.zeros(walk.n, dtype=bool)
    origin = np.full(walk.n, -1, dtype=np.int64)
    for tr in walk.transfers:
        t = walk.tensors[tr.out]
        st, org = _step(walk, tr, status, origin, tr.out in sites)
        status[t.offset : t.offset + t.size] = st
        origin[t.offset : t.offset + t.size] = org
    return status, origin


def _violations(walk: Walker, status: np.ndarray, origin: np.ndarray, prunable_el: np.ndarray, sinks: Iterable[str]) -> set[str]:
    """Tensors where the non-zero values of removed channels that reach a consumer come from."""
    names = list(walk.tensors)
    found: set[str] = set()
    for name in sinks:
        ids = walk.tensors[name].ids
        hit = status[ids] & prunable_el[ids]
        found |= {names[i] for i in np.unique(origin[ids][hit])}
    return found


def _needed(walk: Walker, site: str, sites: set[str], status: np.ndarray, start: int, prunable_el: np.ndarray, sinks: set[str]
) -> bool:
    """Whether a consumer would read non-zero values of removed channels without ``site``:
    recompute only the transfers downstream of it whose inputs changed."""
    status = status.copy()
    origin = np.zeros(walk.n, dtype=np.int64)  # origins do not matter here
    dirty = set()
    for tr in walk.transfers[start:]:
        if tr.out != site and not any(name in dirty for name, _ in tr.sources):
            continue
        t = walk.tensors[tr.out]
        st, _ = _step(walk, tr, status, origin, tr.out in sites and tr.out != site)
        sl = slice(t.offset, t.offset + t.size)
        if np.array_equal(st, status[sl]):
            continue
        status[sl] = st
        dirty.add(tr.out)
        if tr.out in sinks and (st & prunable_el[sl]).any():
            return True
    return any((status[walk.tensors[n].ids] & prunable_el[walk.tensors[n].ids]).any() for n in sinks & dirty)
