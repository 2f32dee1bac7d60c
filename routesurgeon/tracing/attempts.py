"""Tracing in one mode with fallbacks (``fx``, ``fx-concrete``, ``+leaf``) and the error when all
fail."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from routesurgeon.errors import TracingError
from routesurgeon.tracing.inputs import _concrete_args
from routesurgeon.tracing.library import _library_fixes, _library_hint
from routesurgeon.tracing.modes import _probing_training, _TrainingProbe, preserved
from routesurgeon.tracing.tracer import RouteTracer

MAX_AUTO_LEAVES = 24


def _trace_once(
    model: nn.Module,
    bound: dict[str, Any],
    leaf_types: Sequence[type],
    leaf_paths: Sequence[str],
    autowrap: Collection[Callable[..., Any]],
    concrete: bool,
    open_paths: frozenset[str] = frozenset(),
) -> tuple[fx.Graph, RouteTracer]:
    tracer = RouteTracer(leaf_types, leaf_paths, autowrap, concrete=bound if concrete else None,
                         open_paths=open_paths)
    tracer.probe = _TrainingProbe()
    with _probing_training(tracer.probe):
        graph = tracer.trace(model, concrete_args=_concrete_args(bound, model) or None)
    for node in graph.nodes:  # values are only needed while tracing
        node.meta.pop("rs_value", None)
    return graph, tracer


@dataclass
class _ModeTrace:
    """One successful trace in one mode (the graph is not yet compiled into a GraphModule)."""

    graph: fx.Graph
    root: nn.Module
    path: str
    auto_leaves: list[str]
    specializations: list[str]
    batch_specialized: bool
    mode_reads: list[str]  # modules whose ``training`` flag the traced code read
    leaf_specialized: bool

    def module(self, name: str) -> fx.GraphModule:
        return fx.GraphModule(self.root, self.graph, name)


@dataclass
class _Failure:
    module: str
    error: BaseException
    path: str

    def describe(self) -> str:
        where = self.module or "<root>"
        line = getattr(self.error, "_rs_where", "")
        at = f" (at {line})" if line else ""
        return f"{self.path}: in module {where!r}: {type(self.error).__name__}: {self.error}{at}"


def _trace_mode(
    model: nn.Module,
    bound: dict[str, Any],
    leaf_types: Sequence[type],
    user_leaves: Sequence[str],
    autowrap: Collection[Callable[..., Any]],
    auto_leaf: bool,
    attempts: list[str],
    open_paths: frozenset[str] = frozenset(),
    known: tuple[str, list[str]] | None = None,
) -> _ModeTrace:
    """Trace in the model's current mode.

    ``known``: the path and auto leaves the other mode needed; tracing starts from there.
    """
    leaves: list[str] = list(user_leaves)
    auto: list[str] = []
    last: _Failure | None = None
    plans = [("fx", False), ("fx-concrete", True)]
    if known is not None and known[0].startswith("fx-concrete"):
        plans = plans[1:]
    if known is not None:
        auto = [m for m in known[1] if m not in leaves]
        leaves += auto
    for path, concrete in plans:
        while True:
            try:
                with preserved(model), _library_fixes(model):
                    graph, tracer = _trace_once(model, bound, leaf_types, leaves, autowrap,
                                                concrete, open_paths)
                assert tracer.probe is not None
                reads = _module_names(model, tracer.probe.reads)
                return _ModeTrace(graph, tracer.root, path + ("+leaf" if auto else ""), auto,
                                  tracer.specializations, tracer.batch_specialized, reads,
                                  tracer.leaf_specialized)
            except Exception as e:  # any failure of the user's forward under tracing
                module = _failing_module(e)
                last = _Failure(module, e, path + ("+leaf" if auto else ""))
                attempts.append(last.describe())
                if not (concrete and auto_leaf) or len(auto) >= MAX_AUTO_LEAVES:
                    break
                if not module or module in leaves:
                    break
                leaves.append(module)
                auto.append(module)
    assert last is not None
    raise _trace_error(model, last, attempts)


def _module_names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    if not modules:
        return []
    ids = {id(m) for m in modules}
    return [name or "<root>" for name, m in model.named_modules() if id(m) in ids]


def _failing_module(e: BaseException) -> str:
    return getattr(e, "_rs_module", "")


def _trace_error(model: nn.Module, failure: _Failure, attempts: list[str]) -> TracingError:
    where = failure.module or "<root>"
    mod_type = type(model.get_submodule(failure.module)).__name__ if failure.module else type(
        model
    ).__name__
    tried = "\n  - ".join(attempts[-6:])
    line = getattr(failure.error, "_rs_where", "")
    at = f"\nFailing op at {line}" if line else ""
    if failure.module:
        todo = (f"pass leaf_modules=[{where!r}] (or its class {mod_type}) to "
                f"routesurgeon.instrument to treat it as one opaque op, or make the failing op "
                f"in {mod_type}.forward traceable (move Python control flow on tensor values into "
                f"a function decorated with torch.fx.wrap).")
    else:
        todo = (f"the failing op is in {mod_type}.forward itself, which cannot be an opaque leaf: "
                f"move the data-dependent code into a submodule and pass its path in "
                f"leaf_modules=[...], or into a function decorated with torch.fx.wrap.")
    todo = _library_hint(model) or todo
    return TracingError(
        f"could not trace {type(model).__name__}: module {where!r} ({mod_type}) failed with "
        f"{type(failure.error).__name__}: {failure.error}{at}\n"
        f"Paths tried:\n  - {tried}\n"
        f"What to do: {todo}"
    )
