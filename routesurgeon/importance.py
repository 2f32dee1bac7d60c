"""Task-specific importance variables and the dynamic-route algebra of DR-MGF.

For every shared conv/linear weight W (two or more tasks reach it) and every task t sharing it:
``A_t`` (learnable importance, init: the L2 norm of each filter or connection) and ``S_t`` (meta
scale, init ``s0``). Shared norm layers get ``S_t`` only (their ``A`` is 1). See
``../shared/method/drmgf.md`` sections 1-3; the equations are implemented here once and used by
both the reference algorithm and the per-step variant.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

# the route algebra and the gated kernels live in routesurgeon._importance; re-exported here
from routesurgeon._importance.algebra import RouteConfig, dominance, gate, lrn
from routesurgeon._importance.algebra import _norm_dims as _norm_dims
from routesurgeon._importance.algebra import gated_weight as gated_weight
from routesurgeon._importance.algebra import importance_share as importance_share
from routesurgeon._importance.algebra import slice_norms as slice_norms
from routesurgeon._importance.algebra import unit_kernel as unit_kernel
from routesurgeon._importance.kernels import _ACTIVATION_TYPES as _ACTIVATION_TYPES
from routesurgeon._importance.kernels import _EPS as _EPS
from routesurgeon._importance.kernels import _activation_gateable as _activation_gateable
from routesurgeon._importance.kernels import (
    _activation_gated_backward as _activation_gated_backward,
)
from routesurgeon._importance.kernels import _ActivationGated as _ActivationGated
from routesurgeon._importance.kernels import _autocast_off as _autocast_off
from routesurgeon._importance.kernels import _conv_out_numel as _conv_out_numel
from routesurgeon._importance.kernels import _gated_layer as _gated_layer
from routesurgeon._importance.kernels import _GatedKernel as _GatedKernel
from routesurgeon._importance.kernels import _has_hooks as _has_hooks
from routesurgeon._importance.kernels import _unbroadcast as _unbroadcast

__all__ = ["ImportanceBank", "RouteConfig", "dominance", "gate", "lrn"]


class ImportanceBank(nn.Module):
    """``A_t`` and ``S_t`` for every shared weight, keyed by the weight's parameter name."""

    def __init__(
        self,
        weights: Mapping[str, Tensor],
        norms: Mapping[str, Tensor],
        tasks_of: Mapping[str, Sequence[str]],
        cfg: RouteConfig,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.trained = False  # set by the training methods once importance has been learned
        self.names = sorted(weights)
        self.tasks_of = {n: list(tasks_of[n]) for n in self.names}
        self.norm_names = sorted(norms)
        self.norm_tasks = {n: list(tasks_of[n]) for n in self.norm_names}
        # The bias (beta) of a shared norm has its own meta scales, as in the authors' fusion
        # (model_segnet_mt_DRMGF / DRMGF_multi_task_0202_fusionextra.py: S per 1-D parameter).
        for n in self.norm_names:
            self.norm_tasks[_bias_of(n)] = self.norm_tasks[n]
        self.A = nn.ParameterDict()
        self.S = nn.ParameterDict()
        for name in self.names:
            init = slice_norms(weights[name], cfg.granularity).float()
            for t in self.tasks_of[name]:
                self.A[_key(name, t)] = nn.Parameter(init.clone())
                self.S[_key(name, t)] = nn.Parameter(torch.full_like(init, cfg.s0))
        for name in self.norm_names:
            size = norms[name].shape[0]
            for t in self.norm_tasks[name]:
                dev = norms[name].device  # the norm's device, as the weights' A and S
                self.S[_key(name, t)] = nn.Parameter(torch.full((size,), cfg.s0, device=dev))
                self.S[_key(_bias_of(name), t)] = nn.Parameter(
                    torch.full((size,), cfg.s0, device=dev))

    # -- accessors -----------------------------------------------------------------------------
    def a(self, name: str) -> list[Tensor]:
        return [self.A[_key(name, t)] for t in self.tasks_of[name]]

    def s(self, name: str) -> list[Tensor]:
        tasks = self.tasks_of.get(name) or self.norm_tasks[name]
        return [self.S[_key(name, t)] for t in tasks]

    def importance_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.A.values()

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.S.values()

    def gated_weights(self, params: Mapping[str, Tensor], task: str) -> dict[str, Tensor]:
        """Effective weights of ``task``'s gated forward for every shared weight it reaches."""
        out = {}
        for name in self.names:
            tasks = self.tasks_of[name]
            if task in tasks:
                out[name] = gated_weight(params[name], self.a(name), tasks.index(task), self.cfg)
        return out

    @torch.no_grad()
    def bake_(self, params: Mapping[str, Tensor], task: str) -> None:
        """``W := G_t * W / ||W||`` in place for every shared weight in ``params`` that ``task``
        reaches: the values of ``gated_weights``, without a gated copy of each weight."""
        for name in self.names:
            tasks = self.tasks_of[name]
            if task not in tasks or name not in params:
                continue
            w = params[name]
            scale = (gate(self.a(name), tasks.index(task), self.cfg)
                     / slice_norms(w, self.cfg.granularity).clamp_min(_EPS))
            w.mul_(scale.reshape(*scale.shape, *([1] * (w.dim() - scale.dim()))))

    def gated_call(self, gm: fx.GraphModule, params: Mapping[str, Tensor], task: str,
                   args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> Any:
        """``task``'s gated forward of the traced graph ``gm`` (the model's, its parameters
        ``params`` by name): ``functional_call(gm, self.gated_weights(params, task), ...)``.

        At filter granularity each shared plain conv/linear layer is gated on its output
        channels instead (``_ActivationGated``: same values and gradients, no gated copy of the
        weight, also under autocast); other layers, connection granularity and hooked modules
        take the weight path.
        """
        kw = dict(kwargs or {})
        plan = self._activation_plan(gm)
        if plan is None or _has_hooks(plan[2]):
            gated = self.gated_weights(params, task)
            return torch.func.functional_call(gm, gated, tuple(args), kw, strict=False)
        gm_act, buffers, _ = plan
        values: dict[str, Tensor] = {}
        gates = self.filter_gates(task)
        for name, g in gates.items():
            if name in buffers:
                values[buffers[name]] = g
            else:
                w = params[name]
                values[name] = _GatedKernel.apply(w, g.reshape(-1, *([1] * (w.dim() - 1))),
                                                  _norm_dims(w, "filter"))
        return torch.func.functional_call(gm_act, values, tuple(args), kw, strict=False)

    def filter_gates(self, task: str) -> dict[str, Tensor]:
        """``gate(self.a(name), t, cfg)`` for every shared weight ``task`` reaches, at filter
        granularity, in a dozen batched ops (not a dozen per layer): every A of those layers
        in one vector, P elementwise, the per-filter sum over tasks by ``index_add``."""
        if self.cfg.granularity != "filter":
            raise NotImplementedError("filter_gates is for granularity='filter'; use gate()")
        plans = self.__dict__.setdefault("_gate_plans", {})
        if task not in plans:
            names = [n for n in self.names if task in self.tasks_of[n]]
            keys, pos, own_sel, own_pos, denom, sizes = [], [], [], [], [], []
            at = start = 0
            for n in names:
                tasks = self.tasks_of[n]
                size = self.A[_key(n, tasks[0])].numel()
                for t in tasks:
                    keys.append(_key(n, t))
                    pos.append(torch.arange(start, start + size))
                    if t == task:
                        own_sel.append(torch.arange(at, at + size))
                    at += size
                own_pos.append(torch.arange(start, start + size))
                denom.append(torch.full((size,), self.cfg.rho + len(tasks) - 1))
                sizes.append(size)
                start += size
            plans[task] = (names, keys, torch.cat(pos), torch.cat(own_sel), torch.cat(own_pos),
                           torch.cat(denom), sizes, start)
        names, keys, pos, own_sel, own_pos, denom, sizes, total = plans[task]
        if not names:
            return {}
        flat = torch.cat([self.A[k].reshape(-1) for k in keys])
        dev = flat.device
        if pos.device != dev:  # the index plan moved once to A's device (a GPU), not per call
            pos, own_sel, own_pos, denom = (t.to(dev) for t in (pos, own_sel, own_pos, denom))
            plans[task] = (names, keys, pos, own_sel, own_pos, denom, sizes, total)
        p = lrn(flat, self.cfg.beta, self.cfg.gamma)  # 1-D: each filter by its own magnitude
        summed = torch.zeros(total, dtype=p.dtype, device=dev).index_add(0, pos.to(dev), p)
        own = p.index_select(0, own_sel.to(dev))
        g = (self.cfg.rho * own + (summed.index_select(0, own_pos.to(dev)) - own)) / denom.to(
            device=dev, dtype=p.dtype)
        return dict(zip(names, g.split(sizes), strict=True))

    def _activation_plan(self, gm: fx.GraphModule
                         ) -> tuple[fx.GraphModule, dict[str, str], list[nn.Module]] | None:
        """A copy of ``gm`` whose activation-gateable shared layers call ``_gated_layer`` with a
        gate buffer (empty: the plain layer), cached per graph; ``None`` at connection
        granularity or when no layer qualifies."""
        if self.cfg.granularity != "filter":
            return None
        cache = self.__dict__.setdefault("_plans", {})
        key = id(gm)
        if key in cache and cache[key][0] is gm:
            return cache[key][1]
        count: dict[int, int] = {}
        for _, p in gm.named_parameters(remove_duplicate=False):
            count[id(p)] = count.get(id(p), 0) + 1
        names = set(self.names)
        chosen = []
        for node in gm.graph.nodes:
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            weight = f"{node.target}.weight"
            mod = gm.get_submodule(str(node.target))
            if (weight in names and _activation_gateable(mod)
                    and count.get(id(mod.weight)) == 1):  # not tied to another module
                chosen.append((node.target, weight, mod))
        plan = None
        if chosen:
            gm_act = fx.GraphModule(gm, copy.deepcopy(gm.graph))
            buffers: dict[str, str] = {}
            targets = {}
            for i, (target, weight, _) in enumerate(chosen):
                buffers[weight] = targets[target] = f"_rs_gate_{i}"
                gm_act.register_buffer(buffers[weight], torch.empty(0), persistent=False)
            graph = gm_act.graph
            for node in list(graph.nodes):
                if node.op == "call_module" and node.target in targets:
                    with graph.inserting_before(node):
                        mod_node = graph.get_attr(node.target)
                        gate_node = graph.get_attr(targets[node.target])
                        new = graph.call_function(_gated_layer, (
                            mod_node, gate_node, *node.args, self.cfg.activation_gate_ratio))
                    new.meta = dict(node.meta)
                    node.replace_all_uses_with(new)
                    graph.erase_node(node)
            gm_act.recompile()
            plan = (gm_act, buffers, [m for _, _, m in chosen])
        cache[key] = (gm, plan)
        return plan

    def dominance(self, name: str) -> Tensor:
        """D for the shared weight, norm weight or norm bias ``name``: [T_W, ...] in task order.

        Norm parameters have no learned A (the authors' A is 1), so pi_t = |S_t|.
        """
        if name in self.tasks_of:
            return dominance(self.a(name), self.s(name))
        scales = self.s(name)
        return dominance([torch.ones_like(s) for s in scales], scales)

    def filter_scores(self) -> dict[str, dict[str, Tensor]]:
        """Per shared weight and task, the per-filter dominance (a route score in [0, 1])."""
        out: dict[str, dict[str, Tensor]] = {}
        with torch.no_grad():
            for name in self.names:
                d = self.dominance(name)
                if d.dim() == 3:  # connection granularity: aggregate over inputs
                    d = d.mean(dim=-1)
                out[name] = {t: d[i].detach().clone() for i, t in enumerate(self.tasks_of[name])}
        return out


def _bias_of(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias"


def _key(name: str, task: str) -> str:
    return f"{name}::{task}".replace(".", "__")
