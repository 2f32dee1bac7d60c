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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn

from routesurgeon.branches import on_branch_edges
from routesurgeon.compile import ProbedGraph, cuda_graph_reason, eager_nodes
from routesurgeon.importance import _key
from routesurgeon.methods.base import GradientMethod
from routesurgeon.methods.registry import register_method
from routesurgeon.methods.step_fusion import HypergradientS, fusion_dominance
from routesurgeon.precision import scaled
from routesurgeon.topology import node_reach

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


def _cut_identity(value: Any) -> Any:
    """A new autograd node for each tensor of ``value``: gradients reaching it come only from the
    uses of this copy (the nodes above a cut), not from the other uses of the original."""
    if isinstance(value, Tensor):
        return value.view_as(value) if value.requires_grad else value
    if isinstance(value, tuple | list):
        return type(value)(_cut_identity(v) for v in value)
    return value


_cut_identity_eager = torch.compiler.disable(_cut_identity)


def capture_graph(gm: fx.GraphModule, module_paths: set[str], cut: set[str] | None = None,
                  upper_from: int = 0) -> tuple[fx.GraphModule, list[str], list[str]]:
    """A copy of ``gm`` that also returns the outputs of the given modules' calls and, for the
    nodes named in ``cut``, the identity copies that the nodes from index ``upper_from`` on use
    instead of them; returns it with the module path of each capture and the cut node names."""
    cut = cut or set()
    graph = fx.Graph(owning_module=gm)
    env: dict[fx.Node, fx.Node] = {}
    upper_env: dict[fx.Node, fx.Node] = {}
    captured: list[fx.Node] = []
    names: list[str] = []
    cut_nodes: list[fx.Node] = []
    cut_names: list[str] = []
    out_node = None
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "output":
            out_node = n
            continue
        if i >= upper_from:
            env[n] = graph.node_copy(n, lambda a: upper_env.get(a, env[a]))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op == "call_module" and str(n.target) in module_paths:
            captured.append(env[n])
            names.append(str(n.target))
        if n.name in cut:
            upper_env[n] = graph.call_function(_cut_identity, (env[n],))
            cut_nodes.append(upper_env[n])
            cut_names.append(n.name)
    assert out_node is not None
    original = fx.map_arg(out_node.args[0], lambda a: upper_env.get(a, env[a]))
    graph.output((original, tuple(captured), tuple(cut_nodes)))
    return fx.GraphModule(gm, graph, "Capture"), names, cut_names


def _taylor_score(y: Tensor, g: Tensor, axis: int) -> Tensor:
    """First-order effect of each filter on a task loss: |sum over positions of y * delta|,
    summed over the batch (in float32 under autocast: reduced 16-bit products lose digits)."""
    if y.dtype in (torch.float16, torch.bfloat16):
        y, g = y.float(), g.float()
    if y.dim() == 4 and axis == 1:  # (B, C, H, W): no full-size temporary
        return torch.einsum("bchw,bchw->bc", y, g).abs().sum(0)
    dims = [d for d in range(y.dim()) if d not in (0, axis)]
    contrib = y * g
    return (contrib.sum(dim=dims) if dims else contrib).abs().sum(0)


class _ScaleChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (w,) = ctx.saved_tensors
        axis = 1 if grad.dim() > 2 else grad.dim() - 1
        if w.dim() == 0 or grad.dim() == 0 or w.numel() != grad.shape[axis]:
            return grad * w.mean(), None
        shape = [1] * grad.dim()
        shape[axis] = -1
        return grad * w.reshape(shape).to(grad.dtype), None


class EdgeScale(nn.Module):
    """Identity forward; scales the gradient of one graph edge by ``self.weight`` (per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: Tensor | None = None

    def forward(self, x: Any) -> Any:
        if self.weight is None or not isinstance(x, Tensor) or not x.requires_grad:
            return x
        return _ScaleChannels.apply(x, self.weight)


@dataclass(frozen=True)
class _Edge:
    module: str  # the EdgeScale's path in the branch graph
    layer: str | None  # shared weight whose dominance applies (None: the mean over layers)
    point_tasks: tuple[str, ...]  # tasks the branch point reaches
    branch_tasks: tuple[str, ...]  # tasks the branch reaches


def _producer_layer(node: fx.Node, layer_of: Mapping[str, str]) -> str | None:
    """The shared weight producing ``node``'s channels: walk back along first tensor inputs."""
    seen = 0
    cur: fx.Node | None = node
    while cur is not None and seen < 64:
        if cur.op == "call_module" and str(cur.target) in layer_of:
            return layer_of[str(cur.target)]
        inputs = [a for a in cur.all_input_nodes if a.op != "get_attr"]
        cur = inputs[0] if inputs else None
        seen += 1
    return None


def branch_graph(gm: fx.GraphModule, reach: Mapping[fx.Node, int], tasks: list[str],
                 layer_of: Mapping[str, str]) -> tuple[fx.GraphModule, list[_Edge]]:
    """A copy of ``gm`` with an ``EdgeScale`` on every edge leaving a branch point towards a
    strict subset of its tasks."""
    edges: list[_Edge] = []
    scalers: dict[str, nn.Module] = {}

    def names(bits: int) -> tuple[str, ...]:
        return tuple(t for i, t in enumerate(tasks) if bits >> i & 1)

    def edge_scale(graph: fx.Graph, x: fx.Node, src: fx.Node, point: int, branch: int
                   ) -> fx.Node:
        path = f"routesurgeon_branch.e{len(edges)}"
        scalers[path] = EdgeScale()
        edges.append(_Edge(path, _producer_layer(src, layer_of), names(point), names(branch)))
        return graph.call_module(path, (x,))

    # the graph has no owning module: the EdgeScales join the module tree below
    graph = on_branch_edges(gm, reach, edge_scale)
    root: dict[str, Any] = dict(scalers)
    for n in graph.nodes:
        target = str(n.target)
        if n.op == "call_module" and target not in root:
            root[target] = gm.get_submodule(target)
        elif n.op == "get_attr" and target not in root:
            root[target] = functools.reduce(getattr, target.split("."), gm)
    return fx.GraphModule(root, graph, "BranchScale"), edges


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
        s = self.surgeon
        if self.cfg.mode == "branch":
            reach = node_reach(gm.graph, s.outputs)
            g, edges = branch_graph(gm, reach, self.tasks, self.layer_of)
            return {"gm": g, "edges": edges}
        nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        layers = [n for n in nodes if n.op == "call_module" and str(n.target) in self.layer_of]
        cut_at = 0
        if self.cfg.mode == "depth":
            cut_at = self._cut_index(nodes, layers, index)
        upper_layers = {str(n.target) for n in layers if index[n] >= cut_at}
        cut: set[str] = set()
        if cut_at > 0:
            for n in nodes[:cut_at]:
                if n.op in ("placeholder", "output"):
                    continue
                if any(index[u] >= cut_at for u in n.users):
                    cut.add(n.name)
        g, names, cut_names = capture_graph(gm, upper_layers, cut, cut_at)
        upper_params = self._params_used(nodes[cut_at:], gm)
        lower_params = self._params_used(nodes[:cut_at], gm)
        both = upper_params & lower_params
        if both:
            raise NotImplementedError(
                f"drmgf-step mode='depth': parameters {sorted(both)[:3]} are used on both sides "
                f"of the cut at per_task_from={self.cfg.per_task_from!r}; choose another cut")
        run: Any = g
        if self.compiler is not None and not cut_names and ProbedGraph.eligible(g, names):
            run = ProbedGraph(g, names, self.compiler)  # whole, shared weights detached
        elif self.compiler is not None:  # in segments between the eager shared layers
            run = self.compiler(eager_nodes(g, set(names), {_cut_identity: _cut_identity_eager}))
        return {"gm": g, "run": run, "names": names, "cut_names": cut_names,
                "upper_params": upper_params, "cut_at": cut_at}

    def compile_unsupported(self, cfg: Any) -> str | None:
        if self.cfg.mode == "branch":
            return ("mode='branch' re-assigns its per-channel branch scales (tensors on "
                    "EdgeScale modules) every step, which recompiles the graph each step; use "
                    "mode='exact' or 'depth'")
        return cuda_graph_reason(cfg)  # one forward, a backward per task

    def _cut_index(self, nodes: list[fx.Node], layers: list[fx.Node],
                   index: Mapping[fx.Node, int]) -> int:
        f = self.cfg.per_task_from
        if isinstance(f, str):
            for n in nodes:
                if n.op in ("call_module", "get_attr") and (
                        str(n.target) == f or str(n.target).startswith(f + ".")):
                    return index[n]
            raise ValueError(f"per_task_from={f!r} names no module of the traced graph; "
                             f"e.g. {[str(n.target) for n in layers[:3]]}")
        if not layers:
            return 0
        k = min(math.floor(float(f) * len(layers)), len(layers))
        return index[layers[k]] if k < len(layers) else len(nodes) - 1

    def _params_used(self, nodes: list[fx.Node], gm: fx.GraphModule) -> set[str]:
        used: set[str] = set()
        for n in nodes:
            if n.op == "call_module":
                prefix = str(n.target)
                for pn, _ in gm.get_submodule(prefix).named_parameters():
                    used.add(f"{prefix}.{pn}")
            elif n.op == "get_attr" and str(n.target) in self.params:
                used.add(str(n.target))
        return used

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
            self._set_edge_weights(plan)
            return plan["gm"](*args, **kwargs)
        out, ys, cut = plan["run"](*args, **kwargs)
        flat = [leaf for v in cut for leaf in (v if isinstance(v, tuple | list) else (v,))]
        self._ys = list(ys)
        # where the per-task gradients are taken: the outputs, or a compiled graph's probes
        self._taps = plan["run"].probes if isinstance(plan["run"], ProbedGraph) else self._ys
        self._cut = [c for c in flat if isinstance(c, Tensor) and c.requires_grad]
        return out

    def _set_edge_weights(self, plan: Mapping[str, Any]) -> None:
        bank = self.bank
        with torch.no_grad():
            for e in plan["edges"]:
                mod = plan["gm"].get_submodule(e.module)
                layers = [e.layer] if e.layer is not None else [
                    n for n in bank.names if set(e.point_tasks) <= set(bank.tasks_of[n])]
                weights = []
                for layer in layers:
                    if not set(e.point_tasks) <= set(bank.tasks_of[layer]):
                        continue
                    d = bank.dominance(layer).detach()
                    if d.dim() == 3:
                        d = d.mean(-1)
                    order = bank.tasks_of[layer]
                    d = d[[order.index(t) for t in e.point_tasks]]
                    d = d / d.sum(0, keepdim=True).clamp_min(1e-30)
                    rows = [e.point_tasks.index(t) for t in e.branch_tasks]
                    w = len(e.point_tasks) * d[rows].mean(0)
                    weights.append(w if e.layer is not None else w.mean())
                mod.weight = (weights[0] if e.layer is not None else
                              torch.stack(weights).mean()) if weights else None

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
                                       _taylor_score(ys[k].detach(), g, axes[k])))
            off = len(y_idx)
            for k, g in enumerate(grads[off: off + len(cut)]):
                if g is not None:
                    cut_grads[k] = g if cut_grads[k] is None else cast(Tensor, cut_grads[k]) + g
            for n, g in zip(pnames, grads[off + len(cut):]):
                if g is not None:
                    p = self.params[n]
                    p.grad = g.clone() if p.grad is None else p.grad + g
            del grads
        with torch.no_grad():  # A_t <- ema * A_t + (1 - ema) * score (unscaled)
            for name, t, score in scores:
                a = self.bank.A[_key(name, t)]
                if a.dim() == 1:
                    a.mul_(self.ema).add_(score.to(a.dtype),
                                          alpha=(1 - self.ema) / self.grad_scale)
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
        s = self.surgeon
        for t in self.tasks:
            with s.route(t):
                task_losses = recompute()
            total = task_losses[t] + self.cfg.alpha * sum(
                v for k, v in task_losses.items() if k != t)
            scale = self.grad_scale  # float16: A's gradient through the scaled loss, unscaled
            grads: list[Tensor | None] = list(
                torch.autograd.grad(scaled(total, scale), a_params, allow_unused=True))
            if scale != 1.0:
                if not all(torch.isfinite(g).all() for g in grads if g is not None):
                    continue  # overflow: this task's A step is dropped, as the scaler would
                grads = [g / scale if g is not None else None for g in grads]
            # under a process group, one all-reduce: the global batch's gradient of A is the
            # mean of the ranks' (the losses are means over equal shares; every rank leaves the
            # same A unused), and the loss rides along so all ranks take the same skip decision
            loss = total.detach().reshape(1).clone()
            self.reduce_mean([loss, *(g for g in grads if g is not None)])
            if not torch.isfinite(loss).all():
                continue
            for p, g in zip(a_params, grads):
                p.grad = g
            self._imp_opt.step()
            self._imp_opt.zero_grad(set_to_none=True)
        self.bank.trained = True

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
