"""The cost model of a channel removal, and what the rewrite needs to carry it out.

:class:`Plan` answers the exact params and MACs after removing any set of groups without
rewriting the graph: MACs and unshared weights are sums of products of kept channel counts;
shared and recomputed constants (:class:`~.records.SliceEdit`, :class:`~.records.ValueEdit`) are
computed for real. :class:`Plan` also holds what :mod:`.rewrite` needs: the tensors, the edits and
the initializers they touch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..io.cost import COMPUTE_OPS, count_params, node_macs
from .records import AttrEdit, Kept, SliceEdit, Tensor, ValueEdit, prod
from .walk import Walker


def constant_key(array: np.ndarray) -> tuple:
    """Identity of a constant's content: equal keys share one initializer after a rewrite."""
    return (array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())


def distinct_constants(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The distinct arrays (by :func:`constant_key`) in order of first appearance."""
    seen: dict[tuple, np.ndarray] = {}
    for a in arrays:
        seen.setdefault(constant_key(a), a)
    return list(seen.values())


@dataclass
class Plan:
    """Everything the cost model and the rewrite need, indexed by tensor and node names."""

    tensors: dict[str, Tensor]
    element_group: np.ndarray  # (elements,) group index (all groups)
    prunable: np.ndarray  # (groups,) bool
    slice_edits: list[SliceEdit]
    value_edits: list[ValueEdit]
    attr_edits: list[AttrEdit]
    layers: dict[str, tuple[str | None, str | None]]  # compute node -> (output tensor, input tensor)
    init_uses: dict[str, int]  # initializer name -> number of uses, for those an edit touches
    edit_inits: dict[tuple[str, int], str]  # (node, input index) -> initializer name
    init_arrays: dict[str, np.ndarray]
    base_params: int
    fixed_macs: int
    mac_terms: np.ndarray  # (k, 3): tensor index a, tensor index b (or dummy), factor
    param_terms: np.ndarray  # (k, 4): tensor a, tensor b, factor, original size (unshared slices)
    shared_inits: list[str]  # initializers whose edits are costed by computing the arrays
    slow_keys: list[str]  # shared initializers and added inputs: costed by computing the arrays
    sizes: np.ndarray  # (tensors + 1,) elements per tensor, and 1 for the dummy tensor
    pair_tensor: np.ndarray  # (tensor, group, count) triples of prunable elements
    pair_group: np.ndarray
    pair_count: np.ndarray

    def public_groups(self, name: str | None) -> np.ndarray:
        if name is None:
            return np.zeros(0, dtype=np.int64)
        t = self.tensors[name]
        g = self.element_group[t.offset : t.offset + t.size]
        return np.where(self.prunable[g], g, -1)

    def check_removed(self, removed: np.ndarray) -> np.ndarray:
        removed = np.asarray(removed, dtype=bool)
        if removed.shape != self.prunable.shape:
            raise ValueError(f"removed has shape {removed.shape}, expected ({len(self.prunable)},)")
        if np.any(removed & ~self.prunable):
            bad = np.flatnonzero(removed & ~self.prunable)[:5].tolist()
            raise ValueError(f"groups {bad} are not prunable")
        return removed

    def kept(self, removed: np.ndarray) -> Kept:
        return Kept(self.tensors, ~removed[self.element_group])

    def kept_counts(self, removed: np.ndarray) -> np.ndarray:
        """Kept elements per tensor (and a trailing 1 for the dummy tensor)."""
        sizes = self.sizes
        if len(self.pair_group):
            gone = np.bincount(self.pair_tensor, weights=self.pair_count * removed[self.pair_group], minlength=len(sizes))
            sizes = sizes - np.rint(gone).astype(np.int64)
        return sizes

    def cost(self, removed: np.ndarray) -> tuple[int, int]:
        kept = self.kept_counts(removed)
        t = self.mac_terms
        macs = self.fixed_macs + int(np.sum(kept[t[:, 0]] * kept[t[:, 1]] * t[:, 2]))
        p = self.param_terms
        params = self.base_params + int(np.sum(kept[p[:, 0]] * kept[p[:, 1]] * p[:, 2] - p[:, 3]))
        if self.slow_keys:
            params += self.edited_params_delta(self.kept(removed))
        return params, macs

    def new_constants(self, kept: Kept, names: Iterable[str] | None = None) -> dict[str, tuple[list, list[np.ndarray]]]:
        """Per edited initializer (or new input, keyed by node/index): the edited uses with their
        new arrays (None: unchanged), and the distinct arrays the rewritten model will hold."""
        by_init: dict[str, list[tuple[SliceEdit | ValueEdit, np.ndarray | None]]] = {}
        wanted = None if names is None else set(names)
        for edit in [*self.slice_edits, *self.value_edits]:
            key = self.edit_inits.get((edit.node, edit.index)) or f"<new>{edit.node}:{edit.index}"
            if wanted is not None and key not in wanted:
                continue
            original = self.init_arrays.get(key)
            by_init.setdefault(key, []).append((edit, edit.compute(original, kept)))
        result = {}
        for key, edits in by_init.items():
            original = self.init_arrays.get(key)
            arrays = [a for _, a in edits if a is not None]
            unchanged = len(edits) - len(arrays) + (self.init_uses.get(key, 0) - len(edits))
            if original is not None and unchanged > 0:
                arrays = [original, *arrays]
            result[key] = (edits, distinct_constants(arrays) if arrays else ([] if original is None else [original]))
        return result

    def edited_params_delta(self, kept: Kept) -> int:
        """Params change of the initializers costed by computing their arrays."""
        delta = 0
        for key, (_, arrays) in self.new_constants(kept, self.slow_keys).items():
            original = self.init_arrays.get(key)
            delta += sum(int(a.size) for a in arrays) - (0 if original is None else int(original.size))
        return delta


def build_plan(walk: Walker, element_group: np.ndarray, prunable: np.ndarray) -> Plan:
    """The cost model of a finished walk, for the groups ``element_group`` of every element."""
    tensors = walk.tensors
    dummy = len(tensors)
    index = {name: t.index for name, t in tensors.items()}
    # initializer uses, for sharing
    edit_inits: dict[tuple[str, int], str] = {}
    init_arrays: dict[str, np.ndarray] = {}
    init_uses: dict[str, int] = {}
    nodes = {node.name: node for node in walk.graph}
    for edit in [*walk.slice_edits, *walk.value_edits]:
        node = nodes[edit.node]
        value = node.inputs[edit.index] if edit.index < len(node.inputs) else None
        if value is None:
            continue
        edit_inits[(edit.node, edit.index)] = value.name
        init_arrays[value.name] = walk.const(value)
        init_uses[value.name] = len(value.uses())
    edits_per_init: dict[str, int] = {}
    for key in edit_inits.values():
        edits_per_init[key] = edits_per_init.get(key, 0) + 1
    shared = sorted(k for k in init_arrays if init_uses[k] != 1 or edits_per_init[k] != 1)
    shared_set = set(shared)
    param_terms = []
    for edit in walk.slice_edits:
        key = edit_inits[(edit.node, edit.index)]
        if key in shared_set:
            continue
        axes = [a for a, _ in edit.axes]
        if len(axes) > 2:
            raise AssertionError("constant sliced along more than two axes")
        ta = index[edit.axes[0][1]]
        tb = index[edit.axes[1][1]] if len(edit.axes) > 1 else dummy
        size = prod(edit.shape)
        param_terms.append((ta, tb, size // prod(edit.shape[a] for a in axes), size))
    # MACs: the nodes we model, others fixed
    fixed, mac_terms = 0, []
    for node in walk.graph:
        if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        macs = node_macs(node, walk.shapes)
        term = walk.mac_nodes.get(node.name)
        if term is not None:
            out, inp, factor = term
            ta, tb = index[out], index[inp] if inp is not None else dummy
            full = factor * tensors[out].size * (tensors[inp].size if inp is not None else 1)
            if full == macs and macs > 0:
                mac_terms.append((ta, tb, factor))
                continue
        fixed += macs
    # (tensor, group, count) of prunable elements
    pt, pg, pc = [], [], []
    for t in tensors.values():
        g = element_group[t.offset : t.offset + t.size]
        g = g[prunable[g]]
        if len(g):
            u, c = np.unique(g, return_counts=True)
            pt.append(np.full(len(u), t.index))
            pg.append(u)
            pc.append(c)
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)  # noqa: E731
    return Plan(
        tensors=tensors,
        element_group=element_group,
        prunable=prunable,
        slice_edits=walk.slice_edits,
        value_edits=walk.value_edits,
        attr_edits=walk.attr_edits,
        layers=walk.layers,
        init_uses=init_uses,
        edit_inits=edit_inits,
        init_arrays=init_arrays,
        base_params=count_params(walk.model),
        fixed_macs=fixed,
        mac_terms=np.array(mac_terms, dtype=np.int64).reshape(-1, 3),
        param_terms=np.array(param_terms, dtype=np.int64).reshape(-1, 4),
        shared_inits=shared,
        slow_keys=shared + [f"<new>{e.node}:{e.index}" for e in walk.value_edits if e.original is None],
        sizes=np.array([t.size for t in tensors.values()] + [1], dtype=np.int64),
        pair_tensor=cat(pt, np.int64),
        pair_group=cat(pg, np.int64),
        pair_count=cat(pc, np.float64),
    )
