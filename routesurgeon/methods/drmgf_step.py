"""``drmgf-step``: routesurgeon's per-step variant of DR-MGF (not the authors' algorithm).

Every step, the gradient of a shared conv/linear filter is ``T * sum_t D_t * g_t`` (D_t: the
dominance of task t on that filter, from its importance), exclusive parameters get their own task's
gradient, and the remaining shared parameters (norms, opaque leaves) the equal-weight gradient.

Cost: per-filter weights commute with the weight gradient, so only *activation* gradients flow per
task (one ``autograd.grad`` per task, asking for the shared layers' outputs); every shared weight
gradient is then computed once from the fused output gradient ``T * sum_t D_t * delta_t``.

Modes (``mode=``), cheapest last; each is measured against ``"exact"`` in
``benchmarks/step_bench.py`` (cost, and cosine similarity of its gradient to the exact one):

- ``"exact"`` (default): per-task activation gradients through every shared layer.
- ``"depth"``: per-task activation gradients only from ``per_task_from`` on (a fraction of the
  shared layers in graph order, e.g. ``0.75``, or a module path prefix, e.g. ``"layer4"``). The
  graph is cut just before that point; below the cut every parameter gets the gradient of the summed
  loss (one backward from the cut, with the per-task gradients at the cut added up).
- ``"branch"``: one ordinary backward; only where the graph branches towards different task sets
  (the heads' branch points) the gradient coming back along each branch is scaled per channel by
  ``|R| * mean_{t in branch} D_t`` (R: the tasks the point reaches; D: the dominance of the shared
  layer that produces the point's channels, restricted to R). Equal importance gives exactly the
  equal-weight gradient in every mode.

Importance is learned either from a first-order estimate (``importance="taylor"``, default in the
``exact`` and ``depth`` modes: the EMA of ``|sum(y * delta_t)|`` per filter, free given the per-task
activation gradients; in ``depth`` mode only layers above the cut are updated) or from the gated
forward (``importance="gated"``, default in ``branch`` mode: every ``gated_every`` steps, after the
optimizer step, one gated forward per task of the same batch trains every A with Adam on
``L_t + alpha * sum_{j != t} L_j``, as in the reference algorithm's disentanglement passes).

The graphs live in ``routesurgeon.methods.step_graphs``, the importance estimates in
``routesurgeon.methods.step_importance`` and the fusion options in
``routesurgeon.methods.step_fusion``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn

from routesurgeon.compile import ProbedGraph, cuda_graph_reason
from routesurgeon.methods.base import GradientMethod
from routesurgeon.methods.registry import register_method
from routesurgeon.methods.step_fusion import HypergradientS, fusion_dominance
from routesurgeon.methods.step_graphs import branch_edge_weights, build_plan, capture_graph
from routesurgeon.methods.step_importance import ema_update, gated_importance_step, taylor_score
from routesurgeon.precision import scaled

__all__ = ["DRMGFStep", "DRMGFStepConfig", "capture_graph"]



@dataclass(frozen=True)
class DRMGFStepConfig:
    """Options of ``drmgf-step`` (see the module docstring)."""

    mode: str = "exact"  # "exact" | "depth" | "branch"
    per_task_from: float | str = 0.75  # depth mode: fraction of shared layers or module prefix
    importance: str | None = None  # "taylor" | "gated"; None: taylor, or gated in branch mode
    ema: float = 0.9  # taylor: A <- ema * A + (1 - ema) * score
    gated_every: int = 1  # gated: learn A every this many steps
    alpha: float = 0.5  # gated: weight of the other tasks' losses
    importance_lr: float = 1e-3  # gated: Adam lr of A
    # fusion options (``routesurgeon.methods.step_fusion``; measured in docs/results.md)
    uniform_mix: float = 0.0  # D <- (1 - m) * D + m / T (0: the plain dominance)
    warmup_steps: int = 0  # equal weights for the first steps while importance is learned
    learn_s: str | None = None  # "hypergradient": S learned by a one-step hypergradient
    s_lr: float = 1e-4  # Adam lr of S (learn_s; S starts at RouteConfig.s0 = 1e-3)

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "depth", "branch"):
            raise ValueError(f"mode must be 'exact', 'depth' or 'branch', got {self.mode!r}")
        if self.importance not in (None, "taylor", "gated"):
            raise ValueError(f"importance must be 'taylor' or 'gated', got {self.importance!r}")
        if self.mode == "branch" and self.importance == "taylor":
            raise ValueError("mode='branch' computes no per-task gradients at the shared layers, "
                             "so importance='taylor' is unavailable: use importance='gated'")
        f = self.per_task_from
        if isinstance(f, float | int) and not 0.0 <= float(f) <= 1.0:
            raise ValueError(f"per_task_from must be a fraction in [0, 1] or a module prefix, "
                             f"got {f!r}")
        if self.gated_every < 1:
            raise ValueError(f"gated_every must be >= 1, got {self.gated_every}")
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in [0, 1], got {self.uniform_mix}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.learn_s not in (None, "hypergradient"):
            raise ValueError(f"learn_s must be None or 'hypergradient', got {self.learn_s!r}")
        if self.learn_s is not None and self.mode == "branch":
            raise ValueError("learn_s='hypergradient' needs per-task gradients at the shared "
                             "layers: use mode='exact' or 'depth'")

    @property
    def importance_mode(self) -> str:
        if self.importance is not None:
            return self.importance
        return "gated" if self.mode == "branch" else "taylor"


@register_method("drmgf-step")
class DRMGFStep(GradientMethod):
    """Per-step dominance-weighted fusion of per-task gradients on shared filters."""

    #: the fused gradient is linear in the per-task gradients (the trainer averages ``.grad``);
    #: gated importance averages its own gradient of A with ``reduce_mean``
    data_parallel = "gradients"
    #: each task loss is scaled before its backward; the Taylor importance is unscaled
    supports_loss_scale = True

    def __init__(self, context: Any, **config: Any) -> None:
        self.cfg = DRMGFStepConfig(**config)
        super().__init__(context)
        self.surgeon = context
        self.importance_mode = self.cfg.importance_mode
        self.ema = self.cfg.ema
        bank = context.importance_bank
        self.bank = bank
        self.layer_of = {name.rsplit(".", 1)[0]: name for name in bank.names}
        self._graphs: dict[bool, dict[str, Any]] = {}
        self._ys: list[Tensor] = []
        self._taps: list[Tensor] = []
        self._cut: list[Tensor] = []
        self._plan: dict[str, Any] | None = None
        named = dict(context.model.named_parameters())
        self.params = named
        tasks_of = context.param_tasks()
        self.tasks_of = tasks_of
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
        self._imp_opt: torch.optim.Optimizer | None = None
        self._steps = 0
        self._fused_steps = 0  # backward calls (warm-up)
        self._hyper = (HypergradientS(bank, self.cfg.s_lr, self.cfg.uniform_mix)
                       if self.cfg.learn_s == "hypergradient" else None)

    # -- graphs ---------------------------------------------------------------------------------
    def _build(self, gm: fx.GraphModule) -> dict[str, Any]:
        return build_plan(gm, self.cfg, self.surgeon.outputs, self.tasks, self.layer_of,
                          self.params, self.compiler)

    def compile_unsupported(self, cfg: Any) -> str | None:
        if self.cfg.mode == "branch":
            return ("mode='branch' re-assigns its per-channel branch scales (tensors on "
                    "EdgeScale modules) every step, which recompiles the graph each step; use "
                    "mode='exact' or 'depth'")
        return cuda_graph_reason(cfg)  # one forward, a backward per task

    # -- forward: the plain graph, also returning what the backward needs ---------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        s = self.surgeon
        if s._active_task is not None and s.training:  # the gated forward (importance learning)
            return s(*args, **kwargs)
        key = s.training
        if key not in self._graphs:
            self._graphs[key] = self._build(s.graph_module)
        plan = self._graphs[key]
        self._plan = plan
        if self.cfg.mode == "branch":
            branch_edge_weights(plan, self.bank)
            return plan["gm"](*args, **kwargs)
        out, ys, cut = plan["run"](*args, **kwargs)
        flat = [leaf for v in cut for leaf in (v if isinstance(v, tuple | list) else (v,))]
        self._ys = list(ys)
        # where the per-task gradients are taken: the outputs, or a compiled graph's probes
        self._taps = plan["run"].probes if isinstance(plan["run"], ProbedGraph) else self._ys
        self._cut = [c for c in flat if isinstance(c, Tensor) and c.requires_grad]
        return out

    # -- backward ---------------------------------------------------------------------------------
    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        if self.cfg.mode == "branch":
            total = sum(losses[t] for t in self.tasks)
            scaled(total, self.grad_scale).backward()  # type: ignore[arg-type]
            return {f"loss/{t}": float(losses[t].detach()) for t in self.tasks}
        plan = self._plan
        if plan is None or (not self._ys and not self._cut and (self.layer_of or plan["cut_at"])):
            raise RuntimeError("drmgf-step needs its own forward: call trainer.forward(...) "
                               "(or method.forward(...)) before backward")
        ys, names, cut, taps = self._ys, plan["names"], self._cut, self._taps
        self._ys, self._cut, self._taps = [], [], []
        upper = plan["upper_params"] if plan["cut_at"] > 0 else None
        # the dominance before this step's importance update, as per-channel factors T_W * D_t
        coef: dict[int, dict[int, Tensor]] = {}
        axes: dict[int, int] = {}
        with torch.no_grad():
            for k, n in enumerate(names):
                name = self.layer_of[n]
                tasks = self.bank.tasks_of[name]
                d = self.bank.dominance(name).detach()
                if d.dim() == 3:
                    d = d.mean(-1)  # connection granularity: filter share
                d = fusion_dominance(d, self.cfg.uniform_mix,
                                     self._fused_steps < self.cfg.warmup_steps)
                linear = isinstance(self.surgeon.model.get_submodule(n), nn.Linear)
                axes[k] = ys[k].dim() - 1 if linear or ys[k].dim() <= 2 else 1
                shape = [1] * ys[k].dim()
                shape[axes[k]] = -1
                coef[k] = {self.tasks.index(t): (len(tasks) * d[j]).reshape(shape).to(ys[k])
                           for j, t in enumerate(tasks)}
        self._fused_steps += 1
        fused: dict[int, Tensor] = {}
        per_task: dict[int, dict[int, Tensor]] = {}  # learn_s: layer -> task -> output grad
        scores: list[tuple[str, str, Tensor]] = []
        cut_grads: list[Tensor | None] = [None] * len(cut)
        for i, t in enumerate(self.tasks):
            y_idx = [k for k in range(len(names)) if i in coef[k]]
            pnames = [n for n in self.exclusive[t] + self.other_shared[t]
                      if upper is None or n in upper]
            wanted = [taps[k] for k in y_idx] + list(cut) + [self.params[n] for n in pnames]
            if not wanted:
                continue
            grads = torch.autograd.grad(scaled(losses[t], self.grad_scale), wanted,
                                        retain_graph=True, allow_unused=True)
            with torch.no_grad():  # fold this task's activation gradients in, then drop them
                for k, g in zip(y_idx, grads[: len(y_idx)]):
                    if g is None:
                        continue
                    if self._hyper is not None:
                        # unscaled under fp16 (the hypergradient of S is not a gradient step)
                        per_task.setdefault(k, {})[i] = (g / self.grad_scale
                                                         if self.grad_scale != 1.0 else g)
                    if k in fused:
                        fused[k].addcmul_(g, coef[k][i])
                    else:
                        fused[k] = g * coef[k][i]
                    if self.importance_mode == "taylor":
                        scores.append((self.layer_of[names[k]], t,
                                       taylor_score(ys[k].detach(), g, axes[k])))
            off = len(y_idx)
            for k, g in enumerate(grads[off: off + len(cut)]):
                if g is not None:
                    cut_grads[k] = g if cut_grads[k] is None else cast(Tensor, cut_grads[k]) + g
            for n, g in zip(pnames, grads[off + len(cut):]):
                if g is not None:
                    p = self.params[n]
                    p.grad = g.clone() if p.grad is None else p.grad + g
            del grads
        ema_update(self.bank, scores, self.ema, self.grad_scale)  # unscaled
        # fused weight gradients, one local autograd call per captured layer output
        for k, g_out in fused.items():
            name = self.layer_of[names[k]]
            ps = [self.params[name]]
            bias = name[: -len("weight")] + "bias"
            if bias in self.params:
                ps.append(self.params[bias])
            run = plan["run"]
            wgrads: Sequence[Tensor | None] = (
                run.weight_grads(k, g_out) if isinstance(run, ProbedGraph) else
                torch.autograd.grad(ys[k], ps, grad_outputs=g_out, retain_graph=True,
                                    allow_unused=True))
            for p, wg in zip(ps, wgrads):
                if wg is not None:
                    p.grad = wg if p.grad is None else p.grad + wg
        if self._hyper is not None:
            self._hyper.step(self._task_weight_grads(ys, names, per_task))
        # below the cut (depth mode): one backward of the summed gradients at the cut
        pairs = [(c, g) for c, g in zip(cut, cut_grads) if g is not None]
        if pairs:
            torch.autograd.backward([c for c, _ in pairs], [g for _, g in pairs])
        self.bank.trained = self.bank.trained or self.importance_mode == "taylor"
        return {f"loss/{t}": float(losses[t].detach()) for t in self.tasks}

    def _task_weight_grads(self, ys: list[Tensor], names: list[str],
                           per_task: Mapping[int, Mapping[int, Tensor]]
                           ) -> dict[str, list[Tensor]]:
        """learn_s: each shared layer's per-task weight gradients (layer task order)."""
        out: dict[str, list[Tensor]] = {}
        for k, by_task in per_task.items():
            name = self.layer_of[names[k]]
            order = [self.tasks.index(t) for t in self.bank.tasks_of[name]]
            if not all(i in by_task for i in order):
                continue
            w = self.params[name]
            out[name] = [torch.autograd.grad(ys[k], w, grad_outputs=by_task[i],
                                             retain_graph=True)[0] for i in order]
        return out

    # -- gated importance learning -----------------------------------------------------------------
    def after_step(self, losses: Mapping[str, Tensor],
                   recompute: Callable[[], Mapping[str, Tensor]] | None = None) -> None:
        if self.importance_mode != "gated" or recompute is None:
            return
        self._steps += 1
        if self._steps % self.cfg.gated_every:
            return
        self.learn_importance(recompute)

    def learn_importance(self, recompute: Callable[[], Mapping[str, Tensor]]) -> None:
        """One Adam step on every A per task, from that task's gated forward of the batch."""
        a_params = list(self.bank.importance_parameters())
        if not a_params:
            return
        if self._imp_opt is None:
            self._imp_opt = torch.optim.Adam(a_params, lr=self.cfg.importance_lr)
        gated_importance_step(self.bank, a_params, self._imp_opt, self.surgeon, self.tasks,
                              recompute, self.cfg.alpha, self.grad_scale, self.reduce_mean)

    def state_dict(self) -> dict[str, Any]:
        return {"imp_opt": self._imp_opt.state_dict() if self._imp_opt else None,
                "steps": self._steps, "fused_steps": self._fused_steps,
                "hyper": self._hyper.state_dict() if self._hyper else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps = int(state.get("steps", 0))
        self._fused_steps = int(state.get("fused_steps", 0))
        if self._hyper is not None and state.get("hyper"):
            self._hyper.load_state_dict(state["hyper"])
        if state.get("imp_opt"):
            self._imp_opt = torch.optim.Adam(list(self.bank.importance_parameters()),
                                             lr=self.cfg.importance_lr)
            self._imp_opt.load_state_dict(state["imp_opt"])
