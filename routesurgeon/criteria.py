"""Selection criteria: how much each coupled channel group is worth to each task.

Every criterion ends as one score per channel group and task (``GroupScores``), which
``route_mask`` ranks the same way (per layer, globally, or to a budget). Those that need no data
are named by a string in ``scores=``; those that need batches and task losses are computed with
``criterion_scores(surgeon, name, loader, losses)`` and the result passed as ``scores=``.

* ``learned`` (alias ``importance``): DR-MGF's dominance ``D_t`` (a filter's share of the task
  against the other tasks sharing it), averaged over the group's filters.
* ``raw-importance`` (the default, ``scores=None``): the learned ``|A_t|`` itself (its
  magnitude, not its share).
* ``magnitude``: the L2 norm of each filter alone (``routes.magnitude_scores``).
* ``group-magnitude``: the L2 norm of every parameter slice that carries the group's channels
  (producing filters, norm weights, the input columns of consuming layers), averaged over the
  slices, as torch-pruning's ``GroupMagnitudeImportance`` scores a dependency group.
* ``taylor``: per task, first-order Taylor ``|sum_positions activation * dL_t/dactivation|`` of
  each conv/linear output channel, averaged over the samples of a few batches (Molchanov et al.
  2017), then over the group's channels.
* ``snip``: per task, SNIP connection sensitivity ``sum |w * dL_t/dw|`` of every weight slice of
  the group (DiSparse's per-task saliency, Sun et al. 2022), averaged over the slices.
* ``disparse``: ``snip`` scores with DiSparse's arbitration for shared filters: a route keeps a
  shared group if any task sharing it keeps it at the same level.
* ``random``: seeded uniform scores (the floor every criterion should beat).
* ``tp-taylor`` / ``tp-magnitude`` (``export_routes`` only, with ``budget_flops``): torch-pruning's
  ``GroupTaylorImportance`` / ``GroupMagnitudeImportance`` prunes a per-task copy iteratively to
  the budget, and the channels it keeps become the route (``tp_anchor.mask_of_copy``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx

from routesurgeon.errors import InputError, TaskError
from routesurgeon.tracing import mode

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["CRITERIA", "DATA_CRITERIA", "DEFAULT_CRITERION", "TP_CRITERIA", "GroupScores",
           "criterion_scores", "param_reach"]

CRITERIA = ("learned", "raw-importance", "magnitude", "group-magnitude", "taylor", "snip",
            "disparse", "random")
DATA_CRITERIA = ("taylor", "snip", "disparse")
#: torch-pruning's importance on a per-task copy, mapped back onto a route (``export_routes``)
TP_CRITERIA = ("tp-taylor", "tp-magnitude")
ALIASES = {"importance": "learned"}
#: What ``scores=None`` selects by: the learned ``|A_t|``. In the route-quality study
#: (docs/results.md) it kept more accuracy after BN recalibration than the dominance on
#: recipes 1 and 2; the dominance measures a task's share of a filter, not its importance.
DEFAULT_CRITERION = "raw-importance"


@dataclass(frozen=True)
class GroupScores:
    """Per task, one score per channel group (``nan``: unscored, the group is kept).

    ``arbitration="union"``: a route keeps a shared group when any task sharing it keeps it at
    the same keep level (DiSparse); ``"task"``: each route by its own task's scores.
    """

    criterion: str
    per_task: Mapping[str, np.ndarray]
    arbitration: str = "task"

    def __post_init__(self) -> None:
        if self.arbitration not in ("task", "union"):
            raise InputError(f"arbitration must be 'task' or 'union', got {self.arbitration!r}")

    def of(self, task: str, n_groups: int) -> np.ndarray:
        if task not in self.per_task:
            raise TaskError(f"{self.criterion} scores have no task {task!r}; they have "
                            f"{sorted(self.per_task)}")
        s = np.asarray(self.per_task[task], dtype=np.float64)
        if s.shape != (n_groups,):
            raise InputError(f"{self.criterion} scores for task {task!r} have shape {s.shape}; "
                             f"the model has {n_groups} channel groups (scores of another model?)")
        return s


def canonical(name: str) -> str:
    """The criterion ``name`` stands for; an unknown name lists the available ones."""
    name = ALIASES.get(name, name)
    if name in TP_CRITERIA:
        raise InputError(f"{name!r} selects a route's channels with torch-pruning, not by group "
                         "scores: pass it to export_routes(scores=..., budget_flops=..., "
                         "calibration=..., losses=...)")
    if name not in CRITERIA:
        raise InputError(f"unknown criterion {name!r}; available: {list(CRITERIA)} (or a dict "
                         "{layer: {task: per-filter scores}}, or criterion_scores(...))")
    return name


def param_reach(surgeon: Surgeon) -> dict[str, int]:
    """Task bits of each parameter/buffer path of the traced graph (the layers using it)."""
    gm = surgeon.traced.eval_graph
    by_target: dict[str, int] = {}
    for node in gm.graph.nodes:
        bits = surgeon._reach.get(node, 0)
        if node.op in ("call_module", "get_attr") and bits:
            by_target[str(node.target)] = by_target.get(str(node.target), 0) | bits
    out: dict[str, int] = {}
    for path, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        out[path] = by_target.get(path, 0) | by_target.get(path.rsplit(".", 1)[0], 0)
    return out


def mean_by_group(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per group, ``sums / counts`` (``nan`` where nothing was counted)."""
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _slice_scores(surgeon: Surgeon, value: Callable[[str, torch.Tensor, int], torch.Tensor | None],
                  task: str | None) -> np.ndarray:
    """Per group: the mean over every (weight slice, channel) carrying the group of
    ``value(path, param, axis)`` (a score per index along ``axis``, or ``None`` to skip)."""
    groups = surgeon.channel_groups
    gm = surgeon.traced.eval_graph
    params = dict(gm.named_parameters())
    reach = param_reach(surgeon)
    bit = 0 if task is None else 1 << surgeon.tasks.index(task)
    sums = np.zeros(groups.n_groups)
    counts = np.zeros(groups.n_groups)
    for (path, axis), ids in groups.state.params.items():
        p = params.get(path)
        if p is None or path.rsplit(".", 1)[-1] == "bias":
            continue  # buffers and biases are not scored (torch-pruning's default too)
        if bit and not reach.get(path, 0) & bit:
            continue
        v = value(path, p, axis)
        if v is None:
            continue
        labels = groups.labels[ids]
        sums += np.bincount(labels, weights=v.double().cpu().numpy(), minlength=groups.n_groups)
        counts += np.bincount(labels, minlength=groups.n_groups)
    return mean_by_group(sums, counts)


def _per_index(t: torch.Tensor, axis: int, reduce: str) -> torch.Tensor:
    m = t.detach().movedim(axis, 0)
    m = m.reshape(m.shape[0], -1)
    return m.norm(dim=1) if reduce == "l2" else m.abs().sum(dim=1)


def group_magnitude(surgeon: Surgeon) -> GroupScores:
    """``group-magnitude`` scores (the same for every task)."""
    s = _slice_scores(surgeon, lambda _path, p, axis: _per_index(p, axis, "l2"), None)
    return GroupScores("group-magnitude", {t: s for t in surgeon.tasks})


def random_scores(surgeon: Surgeon, seed: int = 0) -> GroupScores:
    """``random`` scores: a seeded permutation per task."""
    g = np.random.default_rng(seed)
    n = surgeon.channel_groups.n_groups
    return GroupScores("random", {t: g.random(n) for t in surgeon.tasks})


def table_scores(surgeon: Surgeon, name: str, table: Mapping[str, Mapping[str, Any]]
                 ) -> GroupScores:
    """A ``{layer: {task: per-filter scores}}`` table as group scores (mean over filters)."""
    from routesurgeon.routes import table_group_scores

    return GroupScores(name, {t: table_group_scores(surgeon, table, t) for t in surgeon.tasks})


def raw_importance_table(surgeon: Surgeon) -> dict[str, dict[str, torch.Tensor]]:
    """Per shared layer and task, ``|A_t|`` per filter (summed over inputs per connection)."""
    bank = surgeon.importance_bank
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name in bank.names:
            per = {}
            for t, a in zip(bank.tasks_of[name], bank.a(name)):
                m = a.detach().abs()
                per[t] = m.sum(dim=-1) if m.dim() == 2 else m.clone()
            out[name.rsplit(".", 1)[0]] = per
    return out


def named_scores(surgeon: Surgeon, name: str, seed: int = 0) -> GroupScores:
    """The data-free criterion ``name`` (see the module docstring)."""
    name = canonical(name)
    if name in DATA_CRITERIA:
        raise InputError(f"criterion {name!r} needs batches and task losses: pass "
                         f"scores=routesurgeon.criterion_scores(surgeon, {name!r}, loader, losses)")
    if name == "group-magnitude":
        return group_magnitude(surgeon)
    if name == "random":
        return random_scores(surgeon, seed)
    if name == "magnitude":
        from routesurgeon.routes import magnitude_scores

        return table_scores(surgeon, name, magnitude_scores(surgeon))
    if not surgeon.importance_bank.trained:
        raise InputError(
            f"criterion {name!r} reads learned importance, and none exists yet: train with "
            "method='drmgf' or 'drmgf-step' first, or use a criterion that needs no training "
            f"({[c for c in CRITERIA if c not in ('learned', 'raw-importance')]})")
    table = surgeon.route_scores() if name == "learned" else raw_importance_table(surgeon)
    return table_scores(surgeon, name, table or {})


# -- criteria from data ---------------------------------------------------------------------------


class _Capture(fx.Interpreter):
    """Runs the graph and keeps the outputs of ``keep`` nodes (with their autograd history)."""

    def __init__(self, gm: fx.GraphModule, keep: Iterable[fx.Node]) -> None:
        super().__init__(gm)
        self.keep = set(keep)
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.keep and isinstance(value, torch.Tensor):
            self.values[n] = value
        return value


def _split_batch(batch: Any) -> tuple[list[Any], Mapping[str, Any]]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and isinstance(batch[1], Mapping)):
        raise InputError("criterion batches must be (inputs, {task: target}) pairs, got "
                         f"{type(batch).__name__}")
    x = batch[0]
    return (list(x) if isinstance(x, (tuple, list)) else [x]), batch[1]


def criterion_scores(surgeon: Surgeon, criterion: str, loader: Iterable[Any] | None = None,
                     losses: Mapping[str, Callable[[Any, Any], torch.Tensor]] | None = None,
                     batches: int = 4, seed: int = 0) -> GroupScores:
    """Group scores of ``criterion`` for every task; ``taylor``, ``snip`` and ``disparse`` run
    ``batches`` batches of ``loader`` (``(inputs, {task: target})``) through the traced model in
    eval mode with ``losses[task](output, target)``. The model's parameters, gradients, buffers
    and modes are left as they were."""
    name = canonical(criterion)
    if name not in DATA_CRITERIA:
        return named_scores(surgeon, name, seed)
    if loader is None or losses is None:
        raise InputError(f"criterion {name!r} needs loader= (batches of (inputs, "
                         "{task: target})) and losses= ({task: loss(output, target)})")
    missing = [t for t in surgeon.tasks if t not in losses]
    if missing:
        raise TaskError(f"losses has no loss for tasks {missing}; criterion {name!r} scores "
                        f"every task of {surgeon.tasks}")
    if not isinstance(batches, int) or batches < 1:
        raise InputError(f"batches must be a positive int, got {batches!r}")
    if name == "taylor":
        return _taylor(surgeon, loader, losses, batches)
    per_task = _snip(surgeon, loader, losses, batches)
    return GroupScores(name, per_task, "union" if name == "disparse" else "task")


def _batches(loader: Iterable[Any], n: int) -> Iterable[tuple[list[Any], Mapping[str, Any]]]:
    count = 0
    for batch in loader:
        if count == n:
            break
        count += 1
        yield _split_batch(batch)
    if count == 0:
        raise InputError("the criterion loader yielded no batch")


def _taylor(surgeon: Surgeon, loader: Iterable[Any], losses: Mapping[str, Any],
            batches: int) -> GroupScores:
    groups = surgeon.channel_groups
    gm = surgeon.traced.eval_graph
    layers = {n: info for n, info in groups.layers.items() if info["kind"] != "norm"}
    outs = {t: surgeon.outputs.node_of(t) for t in surgeon.tasks}
    id_sum = {t: np.zeros(len(groups.labels)) for t in surgeon.tasks}
    id_seen = np.zeros(len(groups.labels))
    samples = 0
    with mode(surgeon.model, False), torch.enable_grad():
        for inputs, targets in _batches(loader, batches):
            cap = _Capture(gm, [*layers, *outs.values()])
            cap.run(*inputs)
            acts = [cap.values[n] for n in layers if n in cap.values]
            nodes = [n for n in layers if n in cap.values]
            samples += int(acts[0].shape[0]) if acts else 0
            for t, node in outs.items():
                loss = losses[t](cap.values[node], targets[t])
                grads = torch.autograd.grad(loss, acts, retain_graph=True, allow_unused=True)
                for n, a, g in zip(nodes, acts, grads):
                    if g is None:
                        continue
                    axis = groups.spaces[n].axis
                    prod = (a.detach() * g).movedim(axis, -1)
                    per_sample = prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1).abs()
                    id_sum[t][layers[n]["out"]] += per_sample.sum(0).double().cpu().numpy()
            for n in nodes:
                id_seen[layers[n]["out"]] = 1
    per_task = {}
    for t in surgeon.tasks:
        w = np.where(id_seen > 0, id_sum[t] / max(samples, 1), 0.0)
        sums = np.bincount(groups.labels, weights=w, minlength=groups.n_groups)
        counts = np.bincount(groups.labels, weights=id_seen, minlength=groups.n_groups)
        per_task[t] = mean_by_group(sums, counts)
    return GroupScores("taylor", per_task)


def _snip(surgeon: Surgeon, loader: Iterable[Any], losses: Mapping[str, Any],
          batches: int) -> dict[str, np.ndarray]:
    gm = surgeon.traced.eval_graph
    outs = {t: surgeon.outputs.node_of(t) for t in surgeon.tasks}
    scored = sorted({p for (p, _a) in surgeon.channel_groups.state.params})
    named = dict(gm.named_parameters())
    paths = [p for p in scored if p in named and named[p].requires_grad]
    tensors = [named[p] for p in paths]
    sal = {t: {p: torch.zeros_like(named[p]) for p in paths} for t in surgeon.tasks}
    with mode(surgeon.model, False), torch.enable_grad():
        for inputs, targets in _batches(loader, batches):
            cap = _Capture(gm, outs.values())
            cap.run(*inputs)
            for t, node in outs.items():
                loss = losses[t](cap.values[node], targets[t])
                grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
                for p, w, g in zip(paths, tensors, grads):
                    if g is not None:
                        sal[t][p] += (w.detach() * g).abs()
    def summed(table: Mapping[str, torch.Tensor]
               ) -> Callable[[str, torch.Tensor, int], torch.Tensor | None]:
        return lambda path, _p, axis: (_per_index(table[path], axis, "sum")
                                       if path in table else None)

    return {t: _slice_scores(surgeon, summed(sal[t]), t) for t in surgeon.tasks}
