"""Rewrite side-effect-only in-place ops (``x.mul_(g)`` whose result is unused) out of place.

torch.fx records ``out.mul_(gain)`` as a node nobody uses; route extraction would drop it and
compute something else, so ``guards.check_inplace`` refuses it. When the mutated tensor has no
alias that anyone reads after the mutation, the op is equivalent to ``y = out.mul(gain)`` with
every later use of ``out`` reading ``y`` instead; this module makes that rewrite (timm's
``NormFreeBlock`` with ``skipinit``, the ``dm_nfnet`` family, is the case met in the registry).

Aliasing cannot be read from the graph (a module may return its input, a method may return a
view), so it is measured: the graph runs once on the example inputs and every value's storage is
recorded. An op is rewritten only if its target is a fresh tensor: no parameter, buffer or input
shares its storage, and no other node's value that shares it is read after the mutation. Anything
else is left for ``check_inplace`` to refuse.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

__all__ = ["functionalize_unused_inplace"]


def _candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """Unused-result in-place calls with an out-of-place twin (``mul_`` -> ``mul``)."""
    from routesurgeon.guards import inplace_nodes

    found = []
    for n in inplace_nodes(gm):
        if n.users or n.target is operator.setitem or not n.args:
            continue
        if not isinstance(n.args[0], fx.Node):
            continue
        method = n.op == "call_method" and hasattr(torch.Tensor, str(n.target)[:-1])
        function = n.op == "call_function" and getattr(n.target, "__module__", "") in (
            "torch", "torch._C._VariableFunctions") and hasattr(
            torch, getattr(n.target, "__name__", "")[:-1])
        if method or function:
            found.append(n)
    return found


def _storages(value: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_leaves(value)
            if isinstance(t, torch.Tensor) and t.layout == torch.strided}


class _StorageRecorder(fx.Interpreter):
    """Runs the graph keeping every value alive (so no storage address is reused) and records
    the storages each node's value lives in."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.storage: dict[fx.Node, set[int]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.storage[n] = _storages(out)
        return out


def functionalize_unused_inplace(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[str]:
    """Rewrite ``gm``'s unaliased side-effect-only in-place ops; returns the rewritten nodes'
    names. ``inputs`` are the placeholders' values; run under ``no_grad`` in the mode ``gm`` is
    for (the run must not change the model's state: the caller preserves it)."""
    candidates = _candidates(gm)
    if not candidates:
        return []
    rec = _StorageRecorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    owned = set().union(*(_storages(t) for t in (*gm.parameters(), *gm.buffers())))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = []
    for n in candidates:
        x = n.args[0]
        assert isinstance(x, fx.Node)
        target = rec.storage.get(x, set())
        if not target or target & owned:
            continue
        aliases = [a for a in gm.graph.nodes
                   if a is not n and a is not x and rec.storage.get(a, set()) & target]
        if x.op in ("placeholder", "get_attr") or any(
                a.op in ("placeholder", "get_attr") for a in aliases):
            continue
        if any(order[u] > order[n] for a in aliases for u in a.users):
            continue  # someone reads the mutation through another alias: leave it refused
        with gm.graph.inserting_after(n):
            if n.op == "call_method":
                fresh = gm.graph.call_method(str(n.target)[:-1], n.args, dict(n.kwargs))
            else:
                fresh = gm.graph.call_function(getattr(torch, n.target.__name__[:-1]),  # type: ignore[union-attr]
                                               n.args, dict(n.kwargs))
        for u in list(x.users):
            if u is not n and u is not fresh and order.get(u, -1) > order[n]:
                u.replace_input_with(x, fresh)
        done.append(n.name)
        gm.graph.erase_node(n)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
