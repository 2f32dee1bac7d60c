"""Standard de-conflict baselines on the same instrumented model, by name.

Loss-weighting methods come from ``torchjd.scalarization`` (``equal``, ``uncertainty``, ``famo``),
gradient-aggregation methods from ``torchjd.aggregation`` (``pcgrad``, ``cagrad``, ``nash-mtl``,
``upgrad``, ``mgda``, ``imtl-g``): routesurgeon only decides *which* parameters are shared (from the
traced graph) and hands torchjd the per-task Jacobian of exactly those. Exclusive parameters get
their own task's gradient, as in ``torchjd.autojac.mtl_backward``.

``imta-ge`` is IMTA's gradient equilibrium for multi-exit nets (Li et al., ICCV 2019), which torchjd
does not provide: at every point where the graph branches towards different task sets, the gradient
coming back along a branch is scaled by (tasks that branch reaches) / (tasks the point reaches),
which for a chain of exits is IMTA's 1/(n-i) on the exit and (n-i-1)/(n-i) on the trunk.

Under torch.distributed (``routesurgeon.distributed``) every method equals one process on the
global batch: the loss-weighting methods and ``imta-ge`` are linear in the per-task gradients (the
trainer averages ``.grad``; FAMO takes its loss-derived coefficients from the averaged losses),
and the aggregators average their per-task gradient matrix over ranks before aggregating.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from routesurgeon.branches import on_branch_edges
from routesurgeon.compile import cuda_graph_reason
from routesurgeon.methods.base import GradientMethod, stack_losses
from routesurgeon.methods.registry import register_method
from routesurgeon.precision import scaled
from routesurgeon.topology import node_reach

if TYPE_CHECKING:
    import torchjd.scalarization

__all__ = [
    "AggregatorMethod",
    "Equal",
    "Famo",
    "GradientEquilibrium",
    "ScalarizerMethod",
    "Uncertainty",
]


class ScalarizerMethod(GradientMethod):
    """A torchjd ``Scalarizer`` over the task losses, then one ordinary backward."""

    data_parallel = "gradients"  # a weighted sum of the losses: linear in their gradients
    supports_loss_scale = True  # the scalarized loss is scaled, after any non-linearity

    def make_scalarizer(self, n_tasks: int) -> nn.Module:
        raise NotImplementedError

    def __init__(self, context: Any, **config: Any) -> None:
        self.options = config
        super().__init__(context)
        self.scalarizer = self.make_scalarizer(len(self.tasks))

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        loss = self.scalarizer(stack_losses(self.tasks, losses))
        scaled(loss, self.grad_scale).backward()
        return {"loss/total": float(loss.detach())}

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.scalarizer.parameters() if p.requires_grad]


@register_method("equal")
class Equal(ScalarizerMethod):
    """Equal weighting: the plain summed loss."""

    def make_scalarizer(self, n_tasks: int) -> nn.Module:
        from torchjd.scalarization import Sum

        return Sum()


@register_method("uncertainty")
class Uncertainty(ScalarizerMethod):
    """Uncertainty weighting (Kendall et al. 2018): learned log-variances, stepped by the
    model optimizer (the trainer adds them as a parameter group)."""

    def make_scalarizer(self, n_tasks: int) -> nn.Module:
        from torchjd.scalarization import UW

        return UW(n_tasks)


class _Substitute(torch.autograd.Function):
    """``value`` in the forward, while the gradient flows to ``local`` unchanged."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, value: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _global_loss_values(method: GradientMethod, losses: Mapping[str, Tensor]) -> Tensor:
    """The stacked task losses; under torch.distributed their values are the ones averaged over
    ranks (T floats reduced) while the gradient flows through this rank's losses."""
    values = stack_losses(method.tasks, losses)
    if method.distributed:
        global_values = values.detach().clone()
        method.reduce_mean([global_values])
        values = _Substitute.apply(values, global_values)
    return values


@register_method("famo")
class Famo(ScalarizerMethod):
    """FAMO (Liu et al. 2023): its logits are updated from the losses recomputed on the same
    batch after the model step (the trainer passes ``recompute``).

    Its gradient, sum_i c_i * grad(loss_i) with c_i computed from the loss values, is linear in
    the per-task gradients once the c_i are the same on every rank: under torch.distributed the
    coefficients (and the logits' update) use the losses averaged over ranks, while the gradient
    flows through this rank's losses; the trainer then averages the gradients as for ``equal``.
    """

    scalarizer: torchjd.scalarization.FAMO

    def __init__(self, context: Any, lr: float = 0.025, weight_decay: float = 1e-3) -> None:
        self.lr, self.weight_decay = lr, weight_decay
        super().__init__(context)

    def make_scalarizer(self, n_tasks: int) -> nn.Module:
        from torchjd.scalarization import FAMO

        return FAMO(n_tasks, lr=self.lr, weight_decay=self.weight_decay)

    def parameters(self) -> list[nn.Parameter]:
        return []  # FAMO steps its own logits

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        values = _global_loss_values(self, losses)
        loss = self.scalarizer(values)
        scaled(loss, self.grad_scale).backward()  # after FAMO's logarithm of the losses
        return {"loss/total": float(loss.detach())}

    def after_step(self, losses: Mapping[str, Tensor],
                   recompute: Callable[[], Mapping[str, Tensor]] | None = None) -> None:
        if recompute is None:
            raise RuntimeError("famo needs the losses recomputed on the same batch after the "
                               "step: call method.after_step(losses, recompute=fn)")
        with torch.no_grad():
            new = stack_losses(self.tasks, recompute()).detach()
        self.reduce_mean([new])  # the global batch's losses after the step
        self.scalarizer.update(new)

    def state_dict(self) -> dict[str, Any]:
        return {"scalarizer": self.scalarizer.state_dict(),
                "optimizer": (self.scalarizer._optimizer.state_dict()
                              if self.scalarizer._optimizer is not None else None)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scalarizer.load_state_dict(state["scalarizer"])
        if state.get("optimizer") is not None:
            self.scalarizer._optimizer = torch.optim.Adam(
                [self.scalarizer._w], lr=self.lr, weight_decay=self.weight_decay)
            self.scalarizer._optimizer.load_state_dict(state["optimizer"])


class AggregatorMethod(GradientMethod):
    """A torchjd ``Aggregator`` on the Jacobian of the task losses w.r.t. the shared parameters.

    Under torch.distributed the Jacobian (T rows of the shared parameters' size) and the exclusive
    parameters' gradients are averaged over ranks in one all-reduce before aggregating: every rank
    then aggregates the global batch's per-task gradients, identically.
    """

    data_parallel = "jacobian"
    #: the Jacobian of the scaled losses is unscaled before aggregating (Nash-MTL is not
    #: scale-invariant) and the aggregate scaled back, so the GradScaler unscales it exactly
    supports_loss_scale = True

    def make_aggregator(self, n_tasks: int) -> Any:
        raise NotImplementedError

    def compile_unsupported(self, cfg: Any) -> str | None:
        return cuda_graph_reason(cfg)  # one forward, T backward passes (the Jacobian's rows)

    def __init__(self, context: Any, **config: Any) -> None:
        super().__init__(context)
        self.options = config
        self.aggregator = self.make_aggregator(len(self.tasks))
        self.shared = [p for p in context.shared_parameters() if p.requires_grad]
        shared_ids = {id(p) for p in self.shared}
        self.exclusive = [p for t in self.tasks for p in context.task_parameters(t)
                          if p.requires_grad and id(p) not in shared_ids]

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        from torchjd.autojac import backward, jac_to_grad

        stacked = scaled(stack_losses(self.tasks, losses), self.grad_scale)
        if self.exclusive:
            # An exclusive parameter is reached by one loss only: the sum's gradient is its own.
            stacked.sum().backward(inputs=self.exclusive, retain_graph=bool(self.shared))
        if self.shared:
            # under autocast the Jacobian's rows are computed one by one: vmap's batched
            # backward of a BatchNorm with 16-bit input and float32 weight raises a dtype error;
            # so under compile: vmap cannot batch AOTAutograd's compiled backward
            chunk = 1 if self.autocast_dtype is not None or self.compiler is not None else None
            backward(list(stacked.unbind()), inputs=self.shared, parallel_chunk_size=chunk)
        if self.distributed:  # the per-task gradients of the global batch, on every rank
            self.reduce_mean([*(p.jac for p in self.shared),  # type: ignore[attr-defined]
                              *(p.grad for p in self.exclusive if p.grad is not None)])
        if self.shared:
            self._aggregate(jac_to_grad)
        return {"loss/total": float(stacked.detach().sum()) / self.grad_scale}

    def _device(self) -> torch.device:
        """Where the aggregator's state and random draws live: the shared parameters'."""
        return self.shared[0].device if self.shared else torch.device("cpu")

    def _aggregate(self, jac_to_grad: Callable[..., Any]) -> None:
        s = self.grad_scale
        if s == 1.0:
            jac_to_grad(self.shared, self.aggregator)
            return
        from routesurgeon.trainer import all_finite

        jacs = [p.jac for p in self.shared]  # type: ignore[attr-defined]
        if not all_finite(jacs):  # overflow of the scaled backward: the scaler skips the step
            for p, j in zip(self.shared, jacs, strict=True):
                p.grad = j.sum(0)
                del p.jac  # type: ignore[attr-defined]
            return
        torch._foreach_div_(jacs, s)
        jac_to_grad(self.shared, self.aggregator)
        torch._foreach_mul_([p.grad for p in self.shared if p.grad is not None], s)


def _aggregator(name: str, factory: Callable[[int, dict[str, Any]], Any], doc: str) -> type:
    cls = type(name, (AggregatorMethod,), {
        "__doc__": doc,
        "__init__": lambda self, context, **config: AggregatorMethod.__init__(
            self, context, **config),
        "make_aggregator": lambda self, n: factory(n, self.options),
    })
    return cls


def _jd(attr: str) -> Any:
    import torchjd.aggregation as agg

    return getattr(agg, attr)


PCGrad = register_method("pcgrad")(_aggregator(
    "PCGrad", lambda n, o: _jd("PCGrad")(**o), "PCGrad (Yu et al. 2020), via torchjd."))
CAGrad = register_method("cagrad")(_aggregator(
    "CAGrad", lambda n, o: _jd("CAGrad")(**{"c": 0.4, **o}),
    "CAGrad (Liu et al. 2021), c = 0.4 by default, via torchjd."))
NashMTL = register_method("nash-mtl")(_aggregator(
    "NashMTL", lambda n, o: _jd("NashMTL")(n_tasks=n, **o),
    "Nash-MTL (Navon et al. 2022), via torchjd (needs cvxpy and ecos)."))
UPGrad = register_method("upgrad")(_aggregator(
    "UPGrad", lambda n, o: _jd("UPGrad")(**o), "UPGrad (Quinton & Rey 2024), via torchjd."))
MGDA = register_method("mgda")(_aggregator(
    "MGDA", lambda n, o: _jd("MGDA")(**o), "MGDA (Sener & Koltun 2018), via torchjd."))
IMTLG = register_method("imtl-g")(_aggregator(
    "IMTLG", lambda n, o: _jd("IMTLG")(**o), "IMTL-G (Liu et al. 2021), via torchjd."))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward; multiplies the gradient flowing back through it by ``scale``."""
    if not isinstance(x, Tensor) or not x.requires_grad:
        return x  # sizes, constants: nothing flows back
    return _ScaleGrad.apply(x, scale)


torch.fx.wrap("scale_grad")


def equilibrium_graph(gm: fx.GraphModule, reach: Mapping[fx.Node, int]) -> fx.GraphModule:
    """A copy of ``gm`` whose branch points scale each branch's gradient by its share of tasks."""

    def scale(graph: fx.Graph, x: fx.Node, _: fx.Node, point: int, branch: int) -> fx.Node:
        return graph.call_function(scale_grad, (x, branch.bit_count() / point.bit_count()))

    return fx.GraphModule(gm, on_branch_edges(gm, reach, scale), "GradientEquilibrium")


@register_method("imta-ge")
class GradientEquilibrium(GradientMethod):
    """IMTA's gradient equilibrium, generalised to any branching multi-output graph."""

    data_parallel = "gradients"  # fixed scales on the backward: linear in the task gradients
    supports_loss_scale = True

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.surgeon = context
        self._graphs: dict[bool, Callable[..., Any]] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        s = self.surgeon
        if s.training not in self._graphs:
            gm = s.graph_module
            eq = equilibrium_graph(gm, node_reach(gm.graph, s.outputs))
            self._graphs[s.training] = self.compiler(eq) if self.compiler is not None else eq
        return self._graphs[s.training](*args, **kwargs)

    def compile_unsupported(self, cfg: Any) -> str | None:
        return None  # one forward and one backward through the compiled equilibrium graph

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        total = stack_losses(self.tasks, losses).sum()
        scaled(total, self.grad_scale).backward()
        return {"loss/total": float(total.detach())}
