"""Outputs that exist only in training (GoogLeNet's and Inception v3's auxiliary logits).

Such a model's eval-mode forward returns fewer outputs than its train-mode forward. Its tasks are
the training outputs, so the analysis (task reach, channel groups, topology) and the exported
routes use the train-mode *code* run with every module in eval mode: a copy of the train graph in
which the functional calls that took ``training=self.training`` (``F.dropout(x, 0.7,
training=self.training)`` in GoogLeNet's aux heads) take ``training=False``. The ``Surgeon`` still
runs the real eval graph in eval mode (``TraceResult.inference_graph``) and the train graph in
train mode. The copy is checked on the example inputs: deterministic, and its outputs include
every eval-mode output exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from routesurgeon.errors import TracingError
from routesurgeon.outputs import expand_namedtuples, output_names
from routesurgeon.tracing.api import TraceResult
from routesurgeon.tracing.modes import mode, preserved

__all__ = ["with_training_outputs"]

_MODE_ARGS = ("training", "train")  # F.dropout(..., training=), torch.dropout(..., train=)


def _tensor_outputs(graph: fx.Graph) -> list[str]:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return [name for name, leaf in output_names(expand_namedtuples(out.args[0]))
            if isinstance(leaf, fx.Node)]


def _eval_flags(graph: fx.Graph) -> list[str]:
    """Set every explicitly passed ``training``/``train`` argument of a function call to False;
    the calls changed, as ``node: target``."""
    changed: list[str] = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        try:
            sig = inspect.signature(n.target)
            bound = sig.bind(*n.args, **n.kwargs)
        except (TypeError, ValueError):
            continue
        names = [a for a in _MODE_ARGS if bound.arguments.get(a) is True]
        if not names:
            continue
        for a in names:
            bound.arguments[a] = False
        n.args, n.kwargs = tuple(bound.args), dict(bound.kwargs)
        changed.append(f"{n.name}: {getattr(n.target, '__name__', n.target)}")
    return changed


def _values(out: Any) -> list[torch.Tensor]:
    return [v for _, v in output_names(out) if isinstance(v, torch.Tensor)]


def with_training_outputs(model: nn.Module, traced: TraceResult, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> TraceResult:
    """``traced`` unchanged unless the train graph returns more tensors than the eval graph; then
    the analysed graph (``eval_graph``) is the train code in eval mode and ``inference_graph`` the
    real eval graph."""
    if not traced.dual:
        return traced
    train_names = _tensor_outputs(traced.train_graph.graph)
    eval_names = _tensor_outputs(traced.eval_graph.graph)
    if len(train_names) <= len(eval_names):
        return traced
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(traced.train_graph.graph, value_map))
    flags = _eval_flags(graph)
    analysed = fx.GraphModule(traced.train_graph, graph, type(model).__name__)
    name = type(model).__name__
    with preserved(model), mode(model, False), torch.no_grad():
        first = _values(analysed(*args, **kwargs))
        again = _values(analysed(*args, **kwargs))
        plain = _values(traced.eval_graph(*args, **kwargs))
    if any(not torch.equal(a, b) for a, b in zip(first, again)):
        raise TracingError(
            f"{name} returns training-only outputs {train_names} (eval mode: {eval_names}); its "
            f"train-mode code run with modules in eval mode is not deterministic (mode-dependent "
            f"calls made eval: {flags or 'none'}), so routes for them cannot be verified. Make "
            f"the extra outputs' random ops read self.training, or pass tasks from the eval "
            f"outputs to a model built without them."
        )
    missing = [eval_names[i] for i, v in enumerate(plain)
               if not any(u.shape == v.shape and torch.equal(u, v) for u in first)]
    if missing:
        raise TracingError(
            f"{name} returns training-only outputs {train_names} (eval mode: {eval_names}), but "
            f"its eval outputs {missing} are not among the train-mode code's outputs run in eval "
            f"mode; routesurgeon cannot tell which task they are. Instrument a wrapper whose "
            f"forward returns the same outputs in both modes."
        )
    only = [n for n, u in zip(train_names, first)
            if not any(u.shape == v.shape and torch.equal(u, v) for v in plain)]
    return dataclasses.replace(traced, eval_graph=analysed, inference_graph=traced.eval_graph,
                               training_only_outputs=only)
