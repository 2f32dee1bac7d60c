"""``drmgf-step``: routesurgeon's per-step variant of DR-MGF (not the authors' algorithm).

Every step, the gradient of a shared conv/linear filter is ``T * sum_t D_t * g_t`` (D_t: the
dominance of task t on that filter, from its importance), exclusive parameters get their own task's
gradient, and the remaining shared parameters (norms, opaque leaves) the equal-weight gradient.

Cost: per-filter weights commute with the weight gradient, so only *activation* gradients flow per
task (one ``autograd.grad`` per task, asking for the shared layers' outputs); every shared weight
gradient is then computed once from the fused output gradient ``T * sum_t D_t * delta_t``.

Importance is learned either from a first-order estimate (``importance="taylor"``, default: the
EMA of ``|sum(y * delta_t)|`` per filter, free given the per-task activation gradients) or from
the gated forward (``importance="gated"``: every ``gated_every`` steps, one gated forward per task
trains A_t with the importance optimiser).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from routesurgeon.importance import _key
from routesurgeon.methods.base import GradientMethod
from routesurgeon.methods.registry import register_method

__all__ = ["DRMGFStep", "capture_graph"]


def capture_graph(gm: fx.GraphModule, module_paths: set[str]) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm`` that also returns the outputs of the given modules' calls."""
    graph = fx.Graph(owning_module=gm)
    env: dict[fx.Node, fx.Node] = {}
    captured: list[fx.Node] = []
    names: list[str] = []
    out_node = None
    for n in gm.graph.nodes:
        if n.op == "output":
            out_node = n
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op == "call_module" and str(n.target) in module_paths:
            captured.append(env[n])
            names.append(str(n.target))
    assert out_node is not None
    original = fx.map_arg(out_node.args[0], lambda a: env[a])
    graph.output((original, tuple(captured)))
    return fx.GraphModule(gm, graph, "Capture"), names


@register_method("drmgf-step")
class DRMGFStep(GradientMethod):
    """Per-step dominance-weighted fusion of per-task gradients on shared filters."""

    def __init__(self, context: Any, importance: str = "taylor", ema: float = 0.9,
                 fuse: bool = True) -> None:
        super().__init__(context)
        if importance not in ("taylor", "gated"):
            raise ValueError(f"importance must be 'taylor' or 'gated', got {importance!r}")
        self.surgeon = context
        self.importance_mode = importance
        self.ema = ema
        self.fuse = fuse
        bank = context.importance_bank
        self.bank = bank
        self.layer_of = {name.rsplit(".", 1)[0]: name for name in bank.names}
        self._captures: dict[bool, tuple[fx.GraphModule, list[str]]] = {}
        self._ys: list[Tensor] = []
        self._y_names: list[str] = []
        named = dict(context.model.named_parameters())
        self.params = named
        tasks_of = context.param_tasks()
        covered: set[str] = set()
        for name in bank.names:
            covered.add(name)
            bias = name[: -len("weight")] + "bias"
            if bias in named:
                covered.add(bias)
        self.covered = covered
        self.exclusive = {t: [n for n, ts in tasks_of.items() if ts == frozenset([t])]
                          for t in self.tasks}
        self.other_shared = {t: [n for n, ts in tasks_of.items()
                                 if len(ts) >= 2 and t in ts and n not in covered]
                             for t in self.tasks}

    # -- forward: the plain graph, also returning the shared layers' outputs ------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        s = self.surgeon
        key = s.training
        if key not in self._captures:
            self._captures[key] = capture_graph(s.graph_module, set(self.layer_of))
        gm, names = self._captures[key]
        out, ys = gm(*args, **kwargs)
        self._ys, self._y_names = list(ys), names
        return out

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        if not self._ys and self.layer_of:
            raise RuntimeError("drmgf-step needs its own forward: call trainer.forward(...) "
                               "(or method.forward(...)) before backward")
        ys, names = self._ys, self._y_names
        self._ys = []
        deltas: dict[str, list[Tensor | None]] = {}
        for i, t in enumerate(self.tasks):
            y_idx = [k for k, n in enumerate(names) if t in self.bank.tasks_of[self.layer_of[n]]]
            pnames = self.exclusive[t] + self.other_shared[t]
            wanted = [ys[k] for k in y_idx] + [self.params[n] for n in pnames]
            last = i == len(self.tasks) - 1 and not self.fuse
            grads = torch.autograd.grad(losses[t], wanted, retain_graph=not last,
                                        allow_unused=True)
            for k, g in zip(y_idx, grads[: len(y_idx)]):
                deltas.setdefault(str(k), [None] * len(self.tasks))[i] = g
            for n, g in zip(pnames, grads[len(y_idx):]):
                if g is not None:
                    p = self.params[n]
                    p.grad = g.clone() if p.grad is None else p.grad + g
        # fused weight gradients, one local autograd call per captured layer output
        with torch.no_grad():
            fused_outputs: list[tuple[int, Tensor]] = []
            for key, per_task in deltas.items():
                k = int(key)
                name = self.layer_of[names[k]]
                tasks = self.bank.tasks_of[name]
                d = self.bank.dominance(name).detach()
                if d.dim() == 3:
                    d = d.mean(-1)  # connection granularity: filter share
                axis = 1 if ys[k].dim() > 2 else ys[k].dim() - 1
                total = None
                for j, t in enumerate(tasks):
                    g = per_task[self.tasks.index(t)]
                    if g is None:
                        continue
                    shape = [1] * g.dim()
                    shape[axis] = -1
                    term = g * d[j].reshape(shape)
                    total = term if total is None else total + term
                if total is not None:
                    fused_outputs.append((k, total * len(tasks)))
                    if self.importance_mode == "taylor":
                        self._taylor(name, ys[k].detach(), per_task, axis)
        for idx, (k, g_out) in enumerate(fused_outputs):
            name = self.layer_of[names[k]]
            ps = [self.params[name]]
            bias = name[: -len("weight")] + "bias"
            if bias in self.params:
                ps.append(self.params[bias])
            grads = torch.autograd.grad(ys[k], ps, grad_outputs=g_out,
                                        retain_graph=idx < len(fused_outputs) - 1,
                                        allow_unused=True)
            for p, g in zip(ps, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        self.bank.trained = self.bank.trained or self.importance_mode == "taylor"
        return {f"loss/{t}": float(losses[t].detach()) for t in self.tasks}

    def _taylor(self, name: str, y: Tensor, per_task: list[Tensor | None], axis: int) -> None:
        """A_t <- ema * A_t + (1 - ema) * |sum(y * delta_t)| per filter (batch mean)."""
        tasks = self.bank.tasks_of[name]
        dims = [d for d in range(y.dim()) if d not in (0, axis)]
        for t in tasks:
            g = per_task[self.tasks.index(t)]
            a = self.bank.A[_key(name, t)]
            if g is None or a.dim() != 1:
                continue
            contrib = (y * g)
            score = (contrib.sum(dim=dims) if dims else contrib).abs().mean(0) * y.shape[0]
            a.mul_(self.ema).add_(score.to(a.dtype), alpha=1 - self.ema)
