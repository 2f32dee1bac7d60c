"""``instrument`` and the ``Surgeon``: a traced, analysed view of the user's model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from routesurgeon.channels import ChannelGroups, analyse_channels
from routesurgeon.errors import InputError, ModelChangedError
from routesurgeon.export import export_routes, masked_graph
from routesurgeon.guards import check_call_inputs, check_inplace, named_tensors, shape_error
from routesurgeon.importance import ImportanceBank, RouteConfig
from routesurgeon.outputs import OutputSpec, resolve_tasks
from routesurgeon.routes import RouteMask, Scores, route_mask
from routesurgeon.shapes import ShapeRecorder, assert_same_outputs
from routesurgeon.topology import Topology, node_reach
from routesurgeon.tracing import (
    TraceResult,
    bind_inputs,
    mode,
    normalize_inputs,
    preserved,
    trace,
)
from routesurgeon.tracing.training_outputs import with_training_outputs

__all__ = ["Surgeon", "instrument"]


class Surgeon(nn.Module):
    """The user's model, traced and analysed.

    A ``Surgeon`` is an ``nn.Module`` that holds the user's model as ``surgeon.model`` and runs its
    traced graph, so it returns exactly what the model returns and trains the same parameters.
    """

    # Set with ``object.__setattr__`` in ``__init__`` (not registered as submodules).
    traced: TraceResult
    outputs: OutputSpec
    _reach: dict[fx.Node, int]
    channel_groups: ChannelGroups
    _active_task: str | None

    def __init__(
        self,
        model: nn.Module,
        traced: TraceResult,
        outputs: OutputSpec,
        example_inputs: tuple[tuple[Any, ...], dict[str, Any]],
        reach: dict[fx.Node, int],
        groups: ChannelGroups,
        topology: Topology,
        timings: dict[str, float],
        route_config: RouteConfig | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # Graphs reference the model's own modules; they are not registered as submodules so the
        # state dict and parameters are the model's.
        object.__setattr__(self, "traced", traced)
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "_reach", reach)
        object.__setattr__(self, "channel_groups", groups)
        self.topology = topology
        self.timings = timings
        self._example_shapes = [
            tuple(x.shape) for x in [*example_inputs[0], *example_inputs[1].values()]
            if isinstance(x, torch.Tensor)
        ]
        self._fingerprint = _fingerprint(model)
        self._example_meta = [(n, torch.empty(x.shape, dtype=x.dtype, device="meta"))
                              for n, x in named_tensors(*example_inputs)]
        object.__setattr__(self, "_active_task", None)
        self.importance_bank = _make_bank(model, self.param_tasks(), route_config)
        bound = bind_inputs(model, *example_inputs)
        self._example_values = [
            bound.get(str(n.target).lstrip("*"))
            for n in traced.eval_graph.graph.nodes if n.op == "placeholder"
        ]
        self.training = model.training

    # -- what it is --------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Task names, in output order."""
        return list(self.outputs.tasks)

    @property
    def trace_path(self) -> str:
        return self.traced.path

    @property
    def graph_module(self) -> fx.GraphModule:
        """The graph run in the current mode."""
        if self.training:
            return self.traced.train_graph
        return self.traced.inference_graph or self.traced.eval_graph

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        check_call_inputs(self.model, self._example_meta, args, kwargs)
        if self.traced.specialized:
            self._check_shapes(args, kwargs)
        task = self._active_task
        if task is None or not self.training:
            try:
                return self.graph_module(*args, **kwargs)
            except RuntimeError as e:
                err = shape_error(self._example_meta, args, kwargs, e)
                if err is None:
                    raise
                raise err from e
        params = dict(self.model.named_parameters())
        return self.importance_bank.gated_call(self.graph_module, params, task, args, kwargs)

    def task_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The forward, with every task's output also in eval mode: when the model's eval forward
        drops training-only outputs (GoogLeNet's aux logits), the analysed graph (its train code
        with modules in eval mode) runs instead."""
        if self.training or self.traced.inference_graph is None:
            return self(*args, **kwargs)
        check_call_inputs(self.model, self._example_meta, args, kwargs)
        if self.traced.specialized:
            self._check_shapes(args, kwargs)
        return self.traced.eval_graph(*args, **kwargs)

    @contextlib.contextmanager
    def route(self, task: str) -> Iterator[None]:
        """Within this context and in train mode, the forward is task ``task``'s gated forward.

        Every shared conv/linear weight W is replaced by ``G_t * W / ||W||`` (DR-MGF's dynamic
        route); in eval mode the forward stays the plain model.
        """
        self.topology._check_task(task)
        previous = self._active_task
        object.__setattr__(self, "_active_task", task)
        try:
            yield
        finally:
            object.__setattr__(self, "_active_task", previous)

    # -- importance ----------------------------------------------------------------------------
    def importance_parameters(self) -> list[nn.Parameter]:
        """The importance variables A_t of every shared conv/linear weight."""
        return list(self.importance_bank.importance_parameters())

    def scale_parameters(self) -> list[nn.Parameter]:
        """The meta scales S_t (learned in DR-MGF's fusion stage)."""
        return list(self.importance_bank.scale_parameters())

    def model_parameters(self) -> list[nn.Parameter]:
        """The user's model's parameters (what the user's optimizer should hold)."""
        return list(self.model.parameters())

    def importance(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per shared layer (module path), per task, per filter: the dominance D_t in [0, 1]."""
        return {name.rsplit(".", 1)[0]: scores
                for name, scores in self.importance_bank.filter_scores().items()}

    def _check_shapes(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        shapes = [tuple(x.shape) for x in [*args, *kwargs.values()] if isinstance(x, torch.Tensor)]
        start = 0 if self.traced.batch_specialized else 1
        for got, want in zip(shapes, self._example_shapes):
            if got[start:] != want[start:]:
                where = "" if start == 0 else " beyond the batch dimension"
                raise InputError(
                    f"input shape {got} differs from the example input {want}{where}, and this "
                    f"model was traced by specialising Python control flow on "
                    f"the example shape ({self.traced.specializations[0]}). Instrument again with "
                    f"an example input of this shape."
                )

    # -- parameters by role ------------------------------------------------------------------
    def param_tasks(self) -> dict[str, frozenset[str]]:
        """For each parameter of the model (by name), the tasks it reaches."""
        # every name of a parameter (tied ones have several) -> its first name, and the
        # parameters under each module path, in one pass over the model
        canon: dict[int, str] = {}
        alias: dict[str, str] = {}
        under: dict[str, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            key = alias[name] = canon.setdefault(id(p), name)
            parts = name.split(".")
            for i in range(1, len(parts)):
                under.setdefault(".".join(parts[:i]), []).append(key)
        bits: dict[str, int] = {}
        for n in self.traced.eval_graph.graph.nodes:
            b = self._reach.get(n, 0)
            if not b:
                continue
            if n.op == "call_module":
                for key in under.get(str(n.target), ()):
                    bits[key] = bits.get(key, 0) | b
            elif n.op == "get_attr":
                key = alias.get(str(n.target), str(n.target))
                bits[key] = bits.get(key, 0) | b
        tasks = self.tasks
        sets: dict[int, frozenset[str]] = {}
        out: dict[str, frozenset[str]] = {}
        for name in canon.values():
            b = bits.get(name, 0)
            if b not in sets:
                sets[b] = frozenset(t for i, t in enumerate(tasks) if b >> i & 1)
            out[name] = sets[b]
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """Model parameters two or more tasks reach."""
        named = dict(self.model.named_parameters())
        return [named[n] for n, ts in self.param_tasks().items() if len(ts) >= 2]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Model parameters only ``task`` reaches."""
        self.topology._check_task(task)
        named = dict(self.model.named_parameters())
        return [named[n] for n, ts in self.param_tasks().items() if ts == frozenset([task])]

    # -- safety --------------------------------------------------------------------------------
    def check_unchanged(self) -> None:
        """Raise ``ModelChangedError`` if the model's parameters changed structure since tracing."""
        now = _fingerprint(self.model)
        if now != self._fingerprint:
            changed = set(self._fingerprint) ^ set(now)  # (name, shape, id) entries
            diff = sorted({(name, shape) for name, shape, _ in changed})[:5]
            raise ModelChangedError(
                f"the model changed after instrumenting (parameters added, removed, replaced or "
                f"reshaped: {diff}); call routesurgeon.instrument again."
            )

    # -- routes and export ----------------------------------------------------------------------
    def example_inputs(self) -> list[Any]:
        """The example inputs in placeholder order (what exported graphs take)."""
        return list(self._example_values)

    def route_masks(self, task: str, keep: float | None = 0.5, threshold: float | None = None,
                    scores: Scores = None, **selection: Any) -> RouteMask:
        """The channels ``task``'s route keeps (see ``routesurgeon.routes.route_mask``:
        ``select=``, ``budget_flops=``, ``budget_params=``)."""
        return route_mask(self, task, keep=keep, threshold=threshold, scores=scores, **selection)

    def masked(self, task: str, keep: float | None = 0.5, threshold: float | None = None,
               scores: Scores = None) -> fx.GraphModule:
        """The full model for ``task`` with the route's dropped channels zeroed (a reference)."""
        return masked_graph(self, self.route_masks(task, keep, threshold, scores))

    def export_routes(
        self,
        keep: float | None = 0.5,
        threshold: float | None = None,
        scores: Scores = None,
        tasks: Sequence[str] | None = None,
        verify_inputs: Sequence[Any] | None = None,
        tol: float = 1e-5,
        union: bool = False,
        **options: Any,
    ) -> Any:
        """Per task, a pruned standalone GraphModule, verified against its masked reference.

        With ``union=True``: one GraphModule returning ``{task: output}`` for ``tasks`` (default
        all), keeping a channel if any of their routes keeps it (see ``routesurgeon.export``;
        ``options``: ``select``, ``budget_flops``, ``budget_params``, ``calibration``,
        ``calibration_batches``, ``reconstruct``, ``losses``, ``score_batches``).
        """
        return export_routes(self, keep=keep, threshold=threshold, scores=scores, tasks=tasks,
                             verify_inputs=verify_inputs, tol=tol, union=union, **options)

    def route_scores(self) -> dict[str, dict[str, Any]] | None:
        """Learned per-task filter scores; ``None`` before any DR-MGF training step."""
        if not self.importance_bank.trained:
            return None
        scores = self.importance()
        # exclusive layers have one task: its score is 1 for every filter
        return scores

    def report(self, path: Any, history: Any = None, routes: Mapping[str, Any] | None = None,
               **kwargs: Any) -> Any:
        """Write the self-contained HTML report (see ``routesurgeon.viz.surgeon_report``).

        ``history``: a Trainer or ``trainer.history``; ``routes``: ``self.export_routes(...)``.
        Returns the path written.
        """
        from routesurgeon.viz.api import surgeon_report

        return surgeon_report(self, path, history=history, routes=routes, **kwargs)

    def conflicts(self, batches: Any, loss_fns: Mapping[str, Any], train: bool | None = None
                  ) -> Any:
        """Per shared layer and task pair, the cosine similarity and norm ratio of the task
        gradients on ``batches`` (see ``routesurgeon.conflicts.measure_conflicts``); nothing
        the model holds is changed."""
        from routesurgeon.conflicts import measure_conflicts

        return measure_conflicts(self, batches, loss_fns, train=train)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, trace={self.trace_path!r}"


def _make_bank(
    model: nn.Module, tasks_of: dict[str, frozenset[str]], cfg: RouteConfig | None
) -> ImportanceBank:
    weights: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        w = m._parameters.get("weight")  # a registered parameter (never a computed attribute)
        key = f"{mname}.weight" if mname else "weight"
        if not isinstance(w, nn.Parameter) or len(tasks_of.get(key, ())) < 2:
            continue
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not getattr(
            m, "transposed", False
        ):
            weights[key] = w
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and (
            w.dim() == 1
        ):
            norms[key] = w
    order = {t: i for i, t in enumerate(sorted({t for ts in tasks_of.values() for t in ts}))}
    tasks = {k: sorted(v, key=order.__getitem__) for k, v in tasks_of.items()}
    return ImportanceBank(weights, norms, tasks, cfg or RouteConfig())


def _fingerprint(model: nn.Module) -> tuple[tuple[str, tuple[int, ...], int], ...]:
    return tuple((n, tuple(p.shape), id(p)) for n, p in model.named_parameters())


def _record_shapes(
    model: nn.Module, gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    bound = bind_inputs(model, args, kwargs)
    values = [bound.get(str(n.target).lstrip("*")) for n in gm.graph.nodes if n.op == "placeholder"]
    return ShapeRecorder(gm).run(*values)


def instrument(
    model: nn.Module,
    example_inputs: Any,
    tasks: Sequence[str] | Mapping[str, str] | None = None,
    leaf_modules: Sequence[str | type] = (),
    verify: bool = True,
    granularity: str = "filter",
    route_config: RouteConfig | None = None,
) -> Surgeon:
    """Trace ``model`` on ``example_inputs`` and analyse how its task outputs share it.

    Args:
        model: any ``nn.Module`` with one or more tensor outputs. It is not modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        tasks: task names (see ``routesurgeon.outputs.resolve_tasks``); default: every output.
        leaf_modules: module paths or classes to treat as opaque ops.
        verify: check that the traced graph reproduces the model's outputs on the example.
        granularity: DR-MGF importance per ``"filter"`` (default) or per ``"connection"``.
        route_config: all dynamic-route hyperparameters (overrides ``granularity``).
    """
    if route_config is None:
        route_config = RouteConfig(granularity=granularity)
    clock = _StageClock()
    args, kwargs = normalize_inputs(example_inputs)
    _check_devices(model, args, kwargs)
    traced = with_training_outputs(model, trace(model, example_inputs, leaf_modules), args, kwargs)
    check_inplace(traced.eval_graph)
    clock.lap("trace")
    with preserved(model), torch.no_grad():
        with mode(model, False):
            got = _record_shapes(model, traced.eval_graph, args, kwargs)
            clock.lap("run")
            if verify:
                expected = model(*args, **kwargs)
                if traced.inference_graph is not None:  # the analysed graph has more outputs
                    got = traced.inference_graph(*args, **kwargs)
                assert_same_outputs(expected, got, "eval mode")
        if verify and traced.dual:
            with mode(model, True):
                cuda = sorted({p.device.index or 0 for p in model.parameters()
                               if p.device.type == "cuda"})
                with torch.random.fork_rng(devices=cuda):  # the same CPU and GPU draws (dropout)
                    got = traced.train_graph(*args, **kwargs)
                expected = model(*args, **kwargs)
                assert_same_outputs(expected, got, "train mode")
    clock.lap("verify")
    outputs = resolve_tasks(traced.eval_graph.graph, tasks)
    if traced.dual:  # the train graph must offer the same outputs
        resolve_tasks(traced.train_graph.graph, dict(zip(outputs.tasks, outputs.task_outputs)))
    reach = node_reach(traced.eval_graph.graph, outputs)
    groups = analyse_channels(traced.eval_graph, reach, outputs)
    topology = Topology.from_graph(traced.eval_graph, outputs, reach, groups)
    clock.lap("analyse")
    surgeon = Surgeon(model, traced, outputs, (args, kwargs), reach, groups, topology,
                      clock.laps, route_config)
    clock.lap("surgeon")
    clock.laps["total"] = clock.total()
    return surgeon


class _StageClock:
    """Wall-clock seconds per stage of ``instrument`` (``Surgeon.timings``).

    Stages: ``trace`` (fx tracing, the train-mode retrace when needed, GraphModule code),
    ``run`` (the eval graph run on the example, recording shapes), ``verify`` (eager forwards and
    the comparisons; train mode too when the graphs differ), ``analyse`` (task reach, channel
    groups, topology), ``surgeon`` (the Surgeon and its importance variables), ``total``.
    """

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.start


def _check_devices(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    devices = {p.device for p in model.parameters()}
    for x in [*args, *kwargs.values()]:
        if isinstance(x, torch.Tensor) and devices and x.device not in devices:
            raise InputError(
                f"example input is on {x.device} but the model's parameters are on "
                f"{sorted(map(str, devices))}; move them to the same device first"
            )
