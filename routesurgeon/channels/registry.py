"""Per-op channel rules: one small handler per op kind, looked up by the op.

A rule reads its inputs' channel spaces from the state and writes its output's space. Ops without
a rule are *opaque*: every channel they touch is fixed (never pruned) and their output is not
tracked. Users extend the registry with ``register_channel_rule``::

    @register_channel_rule(MyGatedAct)          # module type (exact type match)
    def _(st: AnalysisState, node: fx.Node, module: nn.Module) -> None:
        identity(st, node)

Functions are keyed by the callable, ``Tensor`` methods by their name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from routesurgeon.channels.state import AnalysisState, Space
from routesurgeon.shapes import shape_of

__all__ = ["identity", "opaque", "register_channel_rule", "rule_for"]

Rule = Callable[..., None]
_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


def register_channel_rule(*keys: Any) -> Callable[[Rule], Rule]:
    """Register a rule for module types (exact type), functions, or method names (strings).

    Module rules are called as ``rule(state, node, module)``; the others as ``rule(state, node)``.
    """

    def deco(fn: Rule) -> Rule:
        for key in keys:
            if isinstance(key, str):
                _METHOD_RULES[key] = fn
            elif isinstance(key, type) and issubclass(key, nn.Module):
                _MODULE_RULES[key] = fn
            else:
                _FUNCTION_RULES[key] = fn
        return fn

    return deco


def rule_for(node: fx.Node, gm: fx.GraphModule) -> tuple[Rule | None, tuple[Any, ...]]:
    """The rule for ``node`` and the extra arguments it takes (the module, for modules)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return _MODULE_RULES.get(type(module)), (module,)
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target), ()
    if node.op == "call_method":
        return _METHOD_RULES.get(str(node.target)), ()
    return None, ()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _rank(arg: Any) -> int | None:
    s = shape_of(arg) if isinstance(arg, fx.Node) else None
    return None if s is None else len(s)


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return f"{node.op} {name} at node {node.name!r}"


def opaque(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    """Unknown channel semantics: fix every channel the op touches; output untracked."""
    reason = f"unknown channel semantics: {_describe(node)}"
    for arg in node.all_input_nodes:
        st.fix_node(arg, reason, consumer=node)
    st.spaces[node] = None


def identity(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    """Channel-wise op on the first argument (activations, dropout, casts, BN without params)."""
    src = node.args[0] if node.args else None
    s = st.space(src)
    out = shape_of(node)
    if s is None or out is None or len(out) != _rank(src) or out[s.axis] != len(s):
        if s is not None:
            st.fix(s.ids, f"shape changed by {_describe(node)}")
            st.consume(node, s.ids)
        st.spaces[node] = None
        return
    st.spaces[node] = s


def _ignore(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    """Ops that only read metadata (size, dim, shape): no channel effect."""
    st.spaces[node] = None


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _fix_out(st: AnalysisState, node: fx.Node, s: Space, why: str) -> None:
    st.fix(s.ids, f"{why}: {_describe(node)}")
    st.consume(node, s.ids)
    st.spaces[node] = None


def _param_shape(st: AnalysisState, path: str) -> tuple[int, ...] | None:
    t: torch.Tensor
    try:
        t = st.gm.get_parameter(path)
    except AttributeError:
        try:
            t = st.gm.get_buffer(path)
        except AttributeError:
            return None
    return tuple(t.shape)
