"""Newer gradient-aggregation baselines, by name, through ``torchjd.aggregation`` (0.18).

Like the aggregators of ``baselines`` (``AggregatorMethod``), each gets the T x (shared
parameters) Jacobian of the task losses; exclusive parameters get their own task's gradient.
Defaults are the paper's where it states one, else the official implementation's (as carried by
torchjd or LibMTL); each class says which.

Where the per-step interface differs from a paper:

- ``modo`` and ``sdmgrad`` need the product of the per-task gradients of two *independent*
  mini-batches, ``J_1 J_2^T`` (their papers draw two or three batches per step). Here every
  method sees one batch per step, so the two samples are this step's Jacobian and the previous
  step's (kept by the method, a T x shared copy): weights from ``J_t J_{t-1}^T``, the update
  ``J_t^T w``. The first step uses ``J_1 J_1^T``. One backward per step, like the others.
- ``graddrop`` masks the shared *parameters'* per-task gradients (torchjd's form); the paper
  applies the sign dropout to the gradients at a shared activation.
- ``gradvac`` works on the whole shared-parameter vector (LibMTL's default ``whole_model``
  grouping), not per layer.

State: ``gradvac``, ``excess-mtl``, ``modo`` and ``sdmgrad`` keep state across steps (torchjd's
``Stateful`` weightings, plus the previous Jacobian); ``graddrop`` and ``gradvac`` draw random
numbers from a stream of their own (``routesurgeon.methods._rng``). All of it is in the method's
``state_dict``, so a checkpoint resumes exactly (``modo``, ``sdmgrad`` and ``excess-mtl`` carry a
T x shared-parameter tensor there and in memory: 134 MB for a resnet18 trunk and 3 tasks).
Under torch.distributed they all equal one process on the global batch: the Jacobian is averaged
over ranks before aggregating (as for every aggregator), the state is derived from that global
Jacobian, and the random stream is rank 0's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from routesurgeon.methods._rng import OwnRandomStream
from routesurgeon.methods.baselines import AggregatorMethod
from routesurgeon.methods.registry import register_method

__all__ = [
    "AlignedMTLMethod",
    "ConFIGMethod",
    "DualProjMethod",
    "ExcessMTLMethod",
    "FairGradMethod",
    "GradDropMethod",
    "GradVacMethod",
    "MoDoMethod",
    "PairedBatchAggregator",
    "SDMGradMethod",
]


def _agg(attr: str) -> Any:
    import torchjd.aggregation as agg

    return getattr(agg, attr)


class PairedBatchAggregator(nn.Module):
    """A torchjd matrix ``Weighting`` fed ``J_t J_{t-1}^T`` (this step's per-task gradients
    against the previous step's: two independent mini-batches), its weights applied to ``J_t``.

    ``previous`` holds the last Jacobian seen (detached); the first call pairs ``J_1`` with
    itself. A torchjd ``Aggregator`` in all but its base class (``jac_to_grad`` calls it).
    """

    def __init__(self, weighting: nn.Module) -> None:
        super().__init__()
        self.weighting = weighting
        self.previous: Tensor | None = None

    def forward(self, matrix: Tensor) -> Tensor:
        with torch.no_grad():
            prev = self.previous
            if prev is None or prev.shape != matrix.shape:
                prev = matrix
            weights = self.weighting(matrix @ prev.T)
            self.previous = matrix.detach().clone()
            return weights @ matrix


class _StatefulAggregatorMethod(AggregatorMethod):
    """Saves and restores the torchjd weighting's state (its ``_STATE`` attributes) exactly.

    torchjd 0.18 keeps that state in private attributes; ``_key`` rebuilds the guard torchjd
    checks before reusing it (``_state_key``), so a restored state is not thrown away.
    """

    _STATE: tuple[str, ...] = ()

    def _weighting(self) -> Any:
        raise NotImplementedError

    def _key(self, w: Any) -> Any:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        w = self._weighting()
        return {"weighting": {a: _copy(getattr(w, a)) for a in self._STATE}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        w = self._weighting()
        for a, v in state["weighting"].items():
            setattr(w, a, v.to(self._device()) if isinstance(v, Tensor) else v)
        w._state_key = self._key(w)


def _copy(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else v


@register_method("fairgrad")
class FairGradMethod(AggregatorMethod):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024), via
    torchjd: weights solving ``G w = w^(-1/alpha)`` (alpha-fair utility, scipy least squares).
    ``alpha = 2.0``: the value of the official experiments (OptMN-Lab/fairgrad run scripts)."""

    def __init__(self, context: Any, alpha: float = 2.0, max_iters: int | None = None) -> None:
        self.alpha, self.max_iters = alpha, max_iters
        super().__init__(context)

    def make_aggregator(self, n_tasks: int) -> Any:
        return _agg("FairGrad")(alpha=self.alpha, max_iters=self.max_iters)


@register_method("config")
class ConFIGMethod(AggregatorMethod):
    """ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", arXiv 2408.11104, 2024), via torchjd: the direction with equal cosine to every
    unit task gradient (pseudo-inverse), scaled by the sum of the projections; equal
    preferences."""

    def make_aggregator(self, n_tasks: int) -> Any:
        return _agg("ConFIG")(**self.options)


@register_method("aligned-mtl")
class AlignedMTLMethod(AggregatorMethod):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023), via torchjd: the Jacobian's singular values equalised to the smallest
    (``scale_mode="min"``, the paper's Algorithm 1), equal preferences."""

    def __init__(self, context: Any, scale_mode: str = "min") -> None:
        self.scale_mode = scale_mode
        super().__init__(context)

    def make_aggregator(self, n_tasks: int) -> Any:
        return _agg("AlignedMTL")(scale_mode=self.scale_mode)


@register_method("dualproj")
class DualProjMethod(AggregatorMethod):
    """DualProj, via torchjd: the mean gradient projected onto the dual cone of the task
    gradients (the projection of GEM, Lopez-Paz & Ranzato, NeurIPS 2017, Eq. 11), so that no
    task's loss increases to first order."""

    def make_aggregator(self, n_tasks: int) -> Any:
        return _agg("DualProj")(**self.options)


@register_method("graddrop")
class GradDropMethod(AggregatorMethod):
    """GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020), via torchjd: per coordinate,
    keep the gradients of one sign, chosen with probability the positive sign purity
    ``P = (1 + sum g / sum |g|) / 2``; identity ``f`` and no leak (the paper's defaults). The
    uniform draws come from the method's own stream (see the module docstring)."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.stream = OwnRandomStream(self.name)

    def make_aggregator(self, n_tasks: int) -> Any:
        return _agg("GradDrop")()

    def _aggregate(self, jac_to_grad: Any) -> None:
        with self.stream.draws(self._device(), self.reducer):
            super()._aggregate(jac_to_grad)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


@register_method("gradvac")
class GradVacMethod(_StatefulAggregatorMethod):
    """Gradient Vaccine (Wang et al., ICLR 2021), via torchjd: each task gradient is corrected
    towards every other's until their cosine reaches its EMA target ``phi_hat`` (decay ``beta =
    0.5``, the default of LibMTL and torchjd), task order shuffled from the method's stream."""

    _STATE = ("_phi_t",)

    def __init__(self, context: Any, beta: float = 0.5) -> None:
        self.beta = beta
        super().__init__(context)
        self.stream = OwnRandomStream(self.name)

    def make_aggregator(self, n_tasks: int) -> Any:
        return _agg("GradVac")(beta=self.beta)

    def _weighting(self) -> Any:
        return self.aggregator.gramian_weighting

    def _key(self, w: Any) -> Any:
        return None if w._phi_t is None else (w._phi_t.shape[0], w._phi_t.dtype)

    def _device(self) -> torch.device:
        return torch.device("cpu")  # torchjd keeps phi_hat (and its draws) on the CPU

    def _aggregate(self, jac_to_grad: Any) -> None:
        with self.stream.draws(torch.device("cpu"), self.reducer):
            super()._aggregate(jac_to_grad)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stream": self.stream.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.stream.load_state_dict(state["stream"])


@register_method("excess-mtl")
class ExcessMTLMethod(_StatefulAggregatorMethod):
    """ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024), via
    torchjd: exponentiated-gradient task weights from AdaGrad-style excess-risk estimates.
    ``robust_step_size = 1.0``; the first ``warmup_epochs = 3`` epochs keep uniform weights while
    the excess risks are collected, their mean is the baseline the later risks are divided by
    (the paper's Appendix C.1: 3 epochs; counted by ``end_epoch``). ``warmup_epochs=0`` with
    ``n_warmup_steps=k`` warms up for k steps instead; both 0 is the official implementation's
    behaviour (the first step's risk is the baseline). At this step size the weights drift far
    towards one task on the study's MultiLeNet with or without a warm-up (3 epochs, seed 0:
    accuracies 0.41 / 0.66 without, 0.63 / 0.54 after a 1-epoch warm-up, ``equal`` 0.61 / 0.62).
    Keeps a T x shared sum of squared gradients."""

    _STATE = ("_weights", "_sq_grad_sum", "_initial_w", "_warmup_w_sum", "_n_steps",
              "_n_warmup_steps")
    _UNTIL_EPOCH_END = 1 << 62  # torchjd's step count of the warm-up, until the epoch ends

    def __init__(self, context: Any, robust_step_size: float = 1.0, warmup_epochs: int = 3,
                 n_warmup_steps: int = 0) -> None:
        if warmup_epochs < 0 or n_warmup_steps < 0 or (warmup_epochs and n_warmup_steps):
            raise ValueError(f"excess-mtl: give warmup_epochs or n_warmup_steps (>= 0), not both "
                             f"(got {warmup_epochs} and {n_warmup_steps})")
        self.robust_step_size, self.warmup_epochs = robust_step_size, warmup_epochs
        self.n_warmup_steps = self._UNTIL_EPOCH_END if warmup_epochs else n_warmup_steps
        self.epoch = 0
        super().__init__(context)

    def make_aggregator(self, n_tasks: int) -> Any:
        return _agg("ExcessMTL")(self.robust_step_size, self.n_warmup_steps)

    def end_epoch(self) -> None:
        self.epoch += 1
        w = self._weighting()
        if self.warmup_epochs and self.epoch == self.warmup_epochs:
            w.n_warmup_steps = w._n_steps  # the warm-up ends here: its mean risk is the baseline

    def _weighting(self) -> Any:
        return self.aggregator.weighting

    def _key(self, w: Any) -> Any:
        s = w._sq_grad_sum
        return None if s is None else (s.shape[0], s.shape[1], s.dtype, s.device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch = int(state["epoch"])


class _PairedMethod(_StatefulAggregatorMethod):
    """A matrix weighting of ``J_t J_{t-1}^T`` (``PairedBatchAggregator``)."""

    aggregator: PairedBatchAggregator
    _STATE: tuple[str, ...] = ()

    def _weighting(self) -> Any:
        return self.aggregator.weighting

    def _key(self, w: Any) -> Any:
        v = getattr(w, self._STATE[0])
        return None if v is None else (v.shape[0], v.dtype, v.device)

    def state_dict(self) -> dict[str, Any]:
        prev = self.aggregator.previous
        return {**super().state_dict(), "previous": None if prev is None else prev.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        prev = state["previous"]
        self.aggregator.previous = None if prev is None else prev.to(self._device())


@register_method("modo")
class MoDoMethod(_PairedMethod):
    """MoDo (Chen et al., "Three-Way Trade-Off in Multi-Objective Learning", NeurIPS 2023 /
    JMLR 2024), via torchjd's ``MoDoWeighting``: ``lambda <- Proj_simplex(lambda - gamma (J_1
    J_2^T lambda + rho lambda))``, the update ``J^T lambda``. ``gamma = 1e-3``, ``rho = 0.1``:
    the official implementation's defaults (``MoDo_gamma``, ``MoDo_rho`` in LibMTL). The two
    batches are this step's and the previous step's (see the module docstring)."""

    _STATE = ("_lambda",)

    def __init__(self, context: Any, gamma: float = 1e-3, rho: float = 0.1) -> None:
        self.gamma, self.rho = gamma, rho
        super().__init__(context)

    def make_aggregator(self, n_tasks: int) -> Any:
        return PairedBatchAggregator(_agg("MoDoWeighting")(gamma=self.gamma, rho=self.rho))


@register_method("sdmgrad")
class SDMGradMethod(_PairedMethod):
    """SDMGrad (Xiao et al., "Direction-oriented Multi-objective Learning", NeurIPS 2023), via
    torchjd's ``SDMGradWeighting``: simplex weights from 20 momentum-SGD steps (lr 10, momentum
    0.5) on the scale-normalised ``J_1 J_2^T``, pulled towards the mean gradient with ``lambda =
    0.3`` (the official experiments' value). The two batches are this step's and the previous
    step's (see the module docstring)."""

    _STATE = ("_w",)

    def __init__(self, context: Any, lambda_: float = 0.3, lr: float = 10.0,
                 momentum: float = 0.5, n_iter: int = 20) -> None:
        self.opts = {"lambda_": lambda_, "lr": lr, "momentum": momentum, "n_iter": n_iter}
        super().__init__(context)

    def make_aggregator(self, n_tasks: int) -> Any:
        return PairedBatchAggregator(_agg("SDMGradWeighting")(**self.opts))

