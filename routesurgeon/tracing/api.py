"""``trace``: eval-mode trace, a train-mode trace when the eval graph may not hold for it, and the
``TraceResult``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.fx as fx
from torch import nn

from routesurgeon.errors import TracingError
from routesurgeon.tracing.attempts import _ModeTrace, _trace_mode
from routesurgeon.tracing.functionalize import functionalize_unused_inplace
from routesurgeon.tracing.inputs import ExampleInputs, bind_inputs, normalize_inputs
from routesurgeon.tracing.library import _library_leaves, _library_refusal
from routesurgeon.tracing.modes import (
    _class_attrs,
    _mode_switch_changes,
    _unchanged,
    mode,
    preserved,
)

__all__ = ["TraceResult", "trace"]


@dataclass
class TraceResult:
    """What tracing produced and how."""

    train_graph: fx.GraphModule
    eval_graph: fx.GraphModule
    path: str
    leaves: list[str] = field(default_factory=list)
    batch_specialized: bool = False
    specializations: list[str] = field(default_factory=list)
    attempts: list[str] = field(default_factory=list)
    # why the model was traced in train mode too ("" when one eval-mode trace serves both modes)
    retrace_reason: str = ""
    # when the eval-mode forward drops training-only outputs (see ``training_outputs``): the real
    # eval graph, which the Surgeon runs in eval mode; ``eval_graph`` is then the train-mode code
    # run in eval mode, on which tasks are analysed and routes exported
    inference_graph: fx.GraphModule | None = None
    training_only_outputs: list[str] = field(default_factory=list)
    # side-effect-only in-place ops rewritten out of place (``functionalize``)
    functionalized: list[str] = field(default_factory=list)

    @property
    def dual(self) -> bool:
        """True when the model's forward builds a different graph in train and eval mode."""
        return self.train_graph is not self.eval_graph

    @property
    def specialized(self) -> bool:
        return bool(self.specializations)


def trace(
    model: nn.Module,
    example_inputs: ExampleInputs,
    leaf_modules: Sequence[str | type] = (),
    auto_leaf: bool = True,
) -> TraceResult:
    """Trace ``model`` into train- and eval-mode graphs over the same module objects.

    One eval-mode trace serves both modes when that is provably the same graph (see
    ``_retrace_reason``); ``TraceResult.retrace_reason`` says why a second trace was needed.
    """
    if not isinstance(model, nn.Module):
        raise TracingError(f"expected an nn.Module, got {type(model).__name__}")
    refused = _library_refusal(model)
    if refused:
        raise TracingError(refused)
    args, kwargs = normalize_inputs(example_inputs)
    bound = bind_inputs(model, args, kwargs)
    lib_types, autowrap = _library_leaves()
    user_types = [x for x in leaf_modules if isinstance(x, type)]
    user_paths = [x for x in leaf_modules if isinstance(x, str)]
    for p in user_paths:
        try:
            model.get_submodule(p)
        except AttributeError as e:
            raise TracingError(f"leaf_modules names {p!r}, which is not a submodule") from e
    leaf_types = [*lib_types, *user_types]
    # Library leaves (timm's notrace modules) that hold conv/linear layers would hide those layers
    # from the analysis: trace into them (with concrete values if needed); the ones that still
    # fail become leaves again through the auto-leaf fallback.
    layer_types = (nn.modules.conv._ConvNd, nn.Linear)
    lib_tuple, user_tuple = tuple(lib_types), tuple(user_types)
    opened = frozenset(
        name for name, m in model.named_modules()
        if name and lib_tuple and isinstance(m, lib_tuple)
        and not (user_tuple and isinstance(m, user_tuple))
        and any(isinstance(sub, layer_types)
                for sub in cast(nn.Module, m).modules() if sub is not m)
    )  # a leaf that *is* a conv (timm's Conv2dSame) is already visible as one layer
    attempts: list[str] = []
    # Eval mode first (it neither draws random numbers nor updates running statistics while
    # computing concrete values); train mode only when the eval trace may not hold for it.
    name = type(model).__name__
    types = {type(m) for m in model.modules()}
    # nn.Module.train only sets flags (``mode`` restores them); an override may change more
    own_train = any(t.train is not nn.Module.train or t.eval is not nn.Module.eval for t in types)
    keep = preserved if own_train else _unchanged
    with keep(model), mode(model, False):
        ev = _trace_mode(model, bound, leaf_types, user_paths, autowrap, auto_leaf, attempts,
                         opened)
    eval_gm = ev.module(name)
    reason = _retrace_reason(model, ev, types, own_train)
    tr = ev
    train_gm = eval_gm
    if reason:
        with keep(model), mode(model, True):
            tr = _trace_mode(model, bound, leaf_types, user_paths, autowrap, auto_leaf, attempts,
                             opened, known=(ev.path, ev.auto_leaves))
        # same code: one graph serves both modes (no GraphModule is compiled for it)
        if tr.graph.python_code("self").src != eval_gm.code:
            train_gm = tr.module(name)
    values = [bound.get(str(n.target).lstrip("*")) for n in eval_gm.graph.nodes
              if n.op == "placeholder"]
    with keep(model), mode(model, False):
        rewritten = functionalize_unused_inplace(eval_gm, values)
    if train_gm is not eval_gm:
        with preserved(model), mode(model, True), torch.random.fork_rng():
            rewritten += functionalize_unused_inplace(train_gm, values)
    paths = tr.path if tr.path == ev.path else f"{tr.path}/{ev.path}"
    return TraceResult(
        train_graph=train_gm,
        eval_graph=eval_gm,
        path=paths,
        leaves=sorted(set(tr.auto_leaves) | set(ev.auto_leaves)),
        batch_specialized=tr.batch_specialized or ev.batch_specialized,
        specializations=tr.specializations
        + [sp for sp in ev.specializations if sp not in tr.specializations],
        attempts=attempts,
        retrace_reason=reason,
        functionalized=rewritten,
    )


def _retrace_reason(model: nn.Module, ev: _ModeTrace, types: set[type], own_train: bool) -> str:
    """Why the eval-mode graph may not be the train-mode graph ("" when it provably is).

    Tracing runs the model's Python code, and ``model.train()`` changes nothing but the modules'
    ``training`` flags. If no traced code read a flag, the same code runs in train mode and
    produces the same graph, *unless* a class changes other state in ``train``/``eval`` or owns its
    ``training`` attribute, or a value the trace specialised on came from an opaque leaf module
    (it ran in eval mode while tracing; its output's shape could differ in train mode).
    """
    if ev.mode_reads:
        more = f" and {len(ev.mode_reads) - 3} more" if len(ev.mode_reads) > 3 else ""
        return f"traced code reads `training` of {ev.mode_reads[:3]}{more}"
    own = sorted(t.__name__ for t in types if "training" in _class_attrs(t))
    if own:
        return f"{own[:3]} define `training` themselves (its reads cannot be recorded)"
    if own_train:
        changed = _mode_switch_changes(model)
        if changed:
            return f"train() changes more than `training` flags in {changed[:3]}"
    if ev.leaf_specialized:
        return "a specialised value came from an opaque leaf module's output"
    return ""
