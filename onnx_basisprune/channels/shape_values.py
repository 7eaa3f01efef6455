"""Symbolic shape values: what the shape subgraphs of a model (``Shape``/``Size`` and the integer
arithmetic on their outputs) compute, entry by entry, so the analysis knows which channel counts
a shape computation reads (those channels can never be removed) and which Reshape targets are
known constants.

An entry is an int, or the frozenset of (tensor, axis) dimensions it depends on.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

SHAPE_OPS = {
    "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity", "Add", "Sub", "Mul",
    "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Max", "Min", "ReduceProd", "ReduceSum",
}  # fmt: skip


class ShapeValues:
    """Shape tracking of :class:`~.walk.Walker`: ``shape_vals`` maps a shape tensor's name to its
    entries. Uses the walker's ``shapes``, ``tensors``, ``const``, ``attr_int`` and ``mark_bad``."""

    shape_vals: dict[str, list]

    def shape_entries(self, value: ir.Value | None) -> list | None:
        if value is None:
            return None
        if value.name in self.shape_vals:
            return self.shape_vals[value.name]
        array = self.const(value)
        if array is not None and array.dtype.kind in "iu" and array.ndim <= 1:
            return [int(x) for x in np.atleast_1d(array)]
        return None

    def shape_source(self, node: ir.Node) -> None:
        value = node.inputs[0]
        dims = self.shapes.get(value)
        if node.op_type == "Size":
            rank = len(dims) if dims is not None else 8
            self.shape_vals[node.outputs[0].name] = [frozenset((value.name, i) for i in range(rank))]
            return
        if dims is None:
            self.shape_vals[node.outputs[0].name] = [frozenset((value.name, i) for i in range(8))]
            return
        rank = len(dims)
        start = self.attr_int(node, "start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        start, end = max(0, min(start, rank)), max(0, min(end, rank))
        self.shape_vals[node.outputs[0].name] = [frozenset({(value.name, i)}) for i in range(start, end)]

    def shape_eval(self, node: ir.Node) -> bool:
        """Entries of a shape computation's output, or False when it is not understood."""
        op = node.op_type
        ins = [self.shape_entries(v) for v in node.inputs]
        if ins and ins[0] is None:
            return False
        x = ins[0]
        try:
            if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
                out = list(x)
            elif op == "Gather":
                if self.attr_int(node, "axis", 0) != 0 or ins[1] is None:
                    return False
                out = [x[i] for i in ins[1]]
            elif op == "Concat":
                if any(e is None for e in ins):
                    return False
                out = [e for part in ins for e in part]
            elif op == "Slice":
                if len(node.inputs) < 3 or any(e is None for e in ins[1:]):
                    return False
                steps = ins[4][0] if len(ins) > 4 and ins[4] else 1
                out = list(x)[slice(ins[1][0], ins[2][0], steps)]
            elif op in ("Neg", "Abs", "Floor", "Ceil"):
                out = [e if isinstance(e, frozenset) else {"Neg": -e, "Abs": abs(e)}.get(op, e) for e in x]
            elif op in ("ReduceProd", "ReduceSum"):
                deps = frozenset().union(*[e for e in x if isinstance(e, frozenset)])
                out = [deps] if deps else [int(np.prod(x) if op == "ReduceProd" else np.sum(x))]
            else:  # binary arithmetic
                if len(ins) != 2 or ins[1] is None:
                    return False
                a, b = ins
                n = max(len(a), len(b))
                if len(a) not in (1, n) or len(b) not in (1, n):
                    return False
                a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
                out = []
                for ea, eb in zip(a, b):
                    if isinstance(ea, frozenset) or isinstance(eb, frozenset):
                        deps = [e for e in (ea, eb) if isinstance(e, frozenset)]
                        out.append(frozenset().union(*deps))
                    else:
                        f = {"Add": lambda p, q: p + q, "Sub": lambda p, q: p - q, "Mul": lambda p, q: p * q,
                             "Div": lambda p, q: int(p / q), "Mod": lambda p, q: p % q, "Max": max, "Min": min}[op]
                        out.append(int(f(ea, eb)))
        except (IndexError, ZeroDivisionError, KeyError, TypeError):
            return False
        self.shape_vals[node.outputs[0].name] = out
        return True

    def shape_sink(self, value: ir.Value, node: ir.Node) -> None:
        """A shape value used by a node that is not shape arithmetic: channel counts it reads make
        the groups of those tensors unprunable."""
        for entry in self.shape_vals[value.name]:
            if not isinstance(entry, frozenset):
                continue
            for name, axis in entry:
                t = self.tensors.get(name)
                if t is not None and axis == t.axis:
                    reason = f"channel count of '{name}' is read by a shape computation ({node.op_type} '{node.name}')"
                    self.mark_bad(t, reason)
