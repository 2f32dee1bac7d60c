"""Gradient conflicts between tasks: where, per shared layer and task pair, the tasks fight.

For every shared layer (a module whose parameters two or more tasks reach) and every pair of tasks
(a, b) that both reach it, with ``g_t`` the gradient of task t's loss on the layer's parameters
(all of them, flattened into one vector):

- ``cosine[a, b] = <g_a, g_b> / (||g_a|| ||g_b||)``: below 0 the tasks pull the layer in opposing
  directions (the conflict PCGrad, CAGrad, ... act on); NaN when either gradient is zero;
- ``norm_ratio[a, b] = ||g_a|| / ||g_b||``: how much one task dominates the layer's update.

:func:`measure_conflicts` is one measurement on given batches (``surgeon.conflicts(batches,
loss_fns)``, ``routesurgeon conflicts``): one forward per batch and one ``autograd.grad`` per task,
the per-task gradients averaged over the batches (the gradient of the mean loss), nothing written
to ``.grad``, the model's buffers (BatchNorm statistics) and the RNG restored, so training is
unchanged. ``routesurgeon.observe.ConflictMonitor`` samples it during training every ``every``
steps (``Trainer(..., conflicts=True)``); under torch.distributed the per-task gradients are
averaged over ranks first (one all-reduce of T x the shared parameters on a sampled step), so
every rank records the global batch's figures.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from routesurgeon.errors import InputError, LossError
from routesurgeon.outputs import leaf_values

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = [
    "DEFAULT_EVERY",
    "ConflictConfig",
    "Conflicts",
    "SharedLayer",
    "conflicts_of",
    "default_every",
    "measure_conflicts",
    "pair_key",
    "shared_layers",
]

#: The monitor's default sampling interval at T = 3 tasks. One measurement (a forward and T
#: backwards, about (1 + 2T) / 3 plain steps) every ``DEFAULT_EVERY * (T + 1) / 4`` steps keeps
#: its share of training about constant in T; ``benchmarks/step_bench.py`` measures it.
DEFAULT_EVERY = 100


def default_every(n_tasks: int) -> int:
    """The default sampling interval for ``n_tasks`` tasks: ``25 (T + 1)`` steps (100 at T = 3)."""
    return max(1, DEFAULT_EVERY * (n_tasks + 1) // 4)


def pair_key(a: str, b: str) -> str:
    """The name of a task pair in records and logs: ``"a|b"``."""
    return f"{a}|{b}"


@dataclass(frozen=True)
class ConflictConfig:
    """How the ``Trainer`` samples gradient conflicts during training."""

    #: measure on the batch of every this many-th step (and step 0); None: ``default_every(T)``
    every: int | None = None

    def __post_init__(self) -> None:
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"ConflictConfig.every must be a positive int (or None: the "
                             f"default), got {self.every!r}")

    def interval(self, n_tasks: int) -> int:
        """The sampling interval in steps for ``n_tasks`` tasks."""
        return self.every if self.every is not None else default_every(n_tasks)


@dataclass(frozen=True)
class SharedLayer:
    """A module whose parameters two or more tasks reach."""

    name: str
    params: tuple[str, ...]  # parameter names (of the user's model)
    tasks: tuple[str, ...]  # tasks that reach it, in task order


def shared_layers(surgeon: Surgeon) -> list[SharedLayer]:
    """The shared layers, in graph order (trainable parameters reached by 2+ tasks, by module)."""
    tasks = surgeon.tasks
    named = dict(surgeon.model.named_parameters())
    by_module: dict[str, list[str]] = {}
    reach: dict[str, set[str]] = {}
    for name, ts in surgeon.param_tasks().items():
        if len(ts) < 2 or not named[name].requires_grad:
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        by_module.setdefault(module, []).append(name)
        reach.setdefault(module, set()).update(ts)
    gm = surgeon.traced.eval_graph
    order: dict[str, int] = {}
    for i, n in enumerate(gm.graph.nodes):
        if n.op in ("call_module", "get_attr"):
            target = str(n.target)
            order.setdefault(target, i)
            if n.op == "get_attr" and "." in target:
                order.setdefault(target.rsplit(".", 1)[0], i)
    names = sorted(by_module, key=lambda m: (order.get(m, len(order)), m))
    return [SharedLayer(m, tuple(by_module[m]), tuple(t for t in tasks if t in reach[m]))
            for m in names]


def _nan_to_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Conflicts:
    """One measurement: ``cosine`` and ``norm_ratio`` are (layers x pairs), NaN where the pair
    does not share the layer (or a gradient is zero)."""

    layers: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    cosine: Tensor  # float64 (L, P)
    norm_ratio: Tensor  # float64 (L, P)
    norms: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> task -> ||g||
    step: int | None = None
    epoch: int | None = None

    def value(self, layer: str, a: str, b: str, what: str = "cosine") -> float:
        """One figure by layer and task pair (either order for the cosine)."""
        i = self.layers.index(layer)
        if (a, b) in self.pairs:
            j, flip = self.pairs.index((a, b)), False
        elif (b, a) in self.pairs:
            j, flip = self.pairs.index((b, a)), True
        else:
            raise InputError(f"no task pair ({a!r}, {b!r}); pairs are {list(self.pairs)}")
        if what == "cosine":
            return float(self.cosine[i, j])
        v = float(self.norm_ratio[i, j])
        return 1.0 / v if flip else v

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per pair: the mean cosine over the layers it shares, the fraction of those layers
        with a negative cosine (the pair conflicts there) and the lowest cosine."""
        out: dict[str, dict[str, float | None]] = {}
        for j, (a, b) in enumerate(self.pairs):
            col = self.cosine[:, j]
            col = col[torch.isfinite(col)]
            n = int(col.numel())
            out[pair_key(a, b)] = {
                "mean_cosine": float(col.mean()) if n else None,
                "negative_fraction": float((col < 0).double().mean()) if n else None,
                "min_cosine": float(col.min()) if n else None,
                "layers": float(n),
            }
        return out

    def as_record(self) -> dict[str, Any]:
        """JSON-ready: ``{step, epoch, layers, pairs: ["a|b"], layer_tasks, cosine: [[...]],
        norm_ratio}`` (None for undefined values; ``layer_tasks``: the tasks reaching each
        layer); what the history, the report and checkpoints hold."""
        return {
            "step": self.step, "epoch": self.epoch, "layers": list(self.layers),
            "pairs": [pair_key(a, b) for a, b in self.pairs],
            "layer_tasks": [list(self.norms.get(layer, {})) for layer in self.layers],
            "cosine": [[_nan_to_none(float(v)) for v in row] for row in self.cosine.tolist()],
            "norm_ratio": [[_nan_to_none(float(v)) for v in row]
                           for row in self.norm_ratio.tolist()],
        }


LossFn = Callable[[Tensor, Any], Tensor]


def _batch_losses(surgeon: Surgeon, inputs: Any, targets: Mapping[str, Any],
                  loss_fns: Mapping[str, LossFn]) -> dict[str, Tensor]:
    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    out = surgeon.task_forward(*args)
    spec = surgeon.outputs
    values = leaf_values(out, spec.task_outputs)
    losses = {}
    for t, o in zip(spec.tasks, spec.task_outputs):
        if t not in targets:
            raise LossError(f"the batch has no target for task {t!r}; targets are "
                            f"{sorted(targets)}")
        v = loss_fns[t](values[o], targets[t])
        if not isinstance(v, Tensor) or v.dim() != 0:
            raise LossError(f"loss of task {t!r} must be a scalar tensor; reduce it (e.g. "
                            f".mean()) first")
        losses[t] = v
    return losses


def _check_loss_fns(tasks: Sequence[str], loss_fns: Mapping[str, Any]) -> None:
    missing = [t for t in tasks if t not in loss_fns]
    unknown = [k for k in loss_fns if k not in tasks]
    if missing or unknown:
        raise LossError(f"loss_fns must name every task exactly: missing {missing}, unknown "
                        f"{unknown}; tasks are {list(tasks)}")


def measure_conflicts(surgeon: Surgeon, batches: Iterable[Any], loss_fns: Mapping[str, LossFn],
                      train: bool | None = None, layers: Sequence[SharedLayer] | None = None,
                      reduce: Callable[[Sequence[Tensor]], None] | None = None,
                      step: int | None = None, epoch: int | None = None) -> Conflicts:
    """Per shared layer and task pair, the cosine and norm ratio of the task gradients.

    Args:
        batches: ``(inputs, {task: target})`` pairs (one batch alone is accepted too).
        loss_fns: ``{task: loss_fn(output, target)}`` returning scalar (mean) losses.
        train: run the forward in train mode (default: the surgeon's current mode); buffers such
            as BatchNorm running statistics and the RNG state are restored afterwards.
        layers: the layers to measure (default :func:`shared_layers`).
        reduce: averages the per-task gradients in place over data-parallel ranks.
    """
    _check_loss_fns(surgeon.tasks, loss_fns)
    if (isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[1], Mapping)):
        batches = [batches]
    computes = (functools.partial(_batch_losses, surgeon, inputs, targets, loss_fns)
                for inputs, targets in batches)
    return conflicts_of(surgeon, computes, train=train, layers=layers, reduce=reduce, step=step,
                        epoch=epoch)


def conflicts_of(surgeon: Surgeon, computes: Iterable[Callable[[], Mapping[str, Tensor]]],
                 train: bool | None = None, layers: Sequence[SharedLayer] | None = None,
                 reduce: Callable[[Sequence[Tensor]], None] | None = None,
                 step: int | None = None, epoch: int | None = None) -> Conflicts:
    """:func:`measure_conflicts` with the losses computed by the caller: each ``compute()`` runs
    the forward of one batch and returns ``{task: scalar loss}`` (e.g. a Lightning module's
    ``training_step``); the per-task gradients are averaged over the calls."""
    tasks = surgeon.tasks
    layers = list(shared_layers(surgeon) if layers is None else layers)
    named = dict(surgeon.model.named_parameters())
    per_task = {t: [p for la in layers if t in la.tasks for p in la.params] for t in tasks}
    # per task, the summed gradient of each of its shared parameters (None: zero so far); the
    # first batch's gradients are kept as autograd returns them, later ones added in place
    sums: dict[str, list[Tensor | None]] = {t: [None] * len(per_task[t]) for t in tasks}
    was = surgeon.training
    buffers = {k: v.detach().clone() for k, v in surgeon.model.named_buffers()}
    rng = torch.random.get_rng_state()
    count = 0
    try:
        surgeon.train(was if train is None else train)
        for compute in computes:
            with torch.enable_grad():
                losses = compute()
                live = [t for t in tasks if per_task[t]]
                for i, t in enumerate(live):
                    params = [named[p] for p in per_task[t]]
                    grads = torch.autograd.grad(losses[t], params, retain_graph=i < len(live) - 1,
                                                allow_unused=True)
                    acc = sums[t]
                    for pi, g in enumerate(grads):
                        if g is None:
                            continue
                        prev = acc[pi]
                        acc[pi] = g.detach() if prev is None else prev.add_(g)
            count += 1
    finally:
        surgeon.train(was)
        with torch.no_grad():
            for k, v in surgeon.model.named_buffers():
                v.copy_(buffers[k])
        torch.random.set_rng_state(rng)
    if count == 0:
        raise InputError("measure_conflicts needs at least one batch (inputs, {task: target})")
    grads_of: dict[str, list[Tensor]] = {}
    for t in tasks:
        grads_of[t] = [torch.zeros_like(named[p]) if g is None else g
                       for p, g in zip(per_task[t], sums[t])]
        if count > 1:
            torch._foreach_div_(grads_of[t], float(count))
    if reduce is not None:
        reduce([g for t in tasks for g in grads_of[t]])
    return _figures(layers, tasks, per_task, grads_of, step, epoch)


_CHUNK = 1 << 13


def _gram(per_param: Sequence[Sequence[Tensor]]) -> Tensor:
    """The (k x k) float64 Gram matrix of k task gradients given per parameter: in chunks of
    ``_CHUNK`` elements, each chunk's products summed in the gradients' dtype (one small matmul),
    the chunks summed in float64 (accurate to ~1e-7 relative without a float64 copy)."""
    k = len(per_param[0])
    acc = torch.zeros(k, k, dtype=torch.float64, device=per_param[0][0].device)
    for vs in per_param:
        flat = [v.reshape(-1) for v in vs]
        m = flat[0].numel()
        for start in range(0, m, _CHUNK):
            block = torch.stack([v[start:start + _CHUNK] for v in flat])
            acc += (block @ block.T).double()
    return acc.cpu()


def _figures(layers: Sequence[SharedLayer], tasks: Sequence[str],
             per_task: Mapping[str, list[str]], grads: Mapping[str, list[Tensor]],
             step: int | None, epoch: int | None) -> Conflicts:
    """Cosines and norm ratios from each layer's Gram matrix of the task gradients."""
    pairs = tuple(itertools.combinations(tasks, 2))
    col = {p: j for j, p in enumerate(pairs)}
    cos = torch.full((len(layers), len(pairs)), float("nan"), dtype=torch.float64)
    ratio = cos.clone()
    index = {t: {p: i for i, p in enumerate(per_task[t])} for t in tasks}
    norms: dict[str, dict[str, float]] = {}
    for li, la in enumerate(layers):
        gram = _gram([[grads[t][index[t][p]] for t in la.tasks] for p in la.params])
        n = gram.diagonal().clamp_min(0).sqrt()
        norms[la.name] = {t: float(n[i]) for i, t in enumerate(la.tasks)}
        for (i, a), (m, b) in itertools.combinations(enumerate(la.tasks), 2):
            j = col[(a, b)]
            if n[i] > 0 and n[m] > 0:
                cos[li, j] = (gram[i, m] / (n[i] * n[m])).clamp(-1.0, 1.0)
                ratio[li, j] = n[i] / n[m]
    return Conflicts(tuple(la.name for la in layers), pairs, cos, ratio, norms, step, epoch)
