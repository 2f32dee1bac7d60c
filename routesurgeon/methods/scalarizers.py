"""Newer loss-weighting baselines, by name, through ``torchjd.scalarization`` (0.18).

``dwa``, ``rlw``, ``geometric-mean`` and ``stch`` scalarise the task losses and back-propagate
once, like ``equal`` (``ScalarizerMethod``). Their gradient is ``sum_i c_i grad(loss_i)`` with
coefficients ``c_i`` computed from loss values (the current ones, or epoch averages) or random
draws, so under torch.distributed they equal one process on the global batch once the
coefficients are global: the loss values they depend on are the ones averaged over ranks (T
floats all-reduced per step, as for ``famo``) while the gradient flows through this rank's losses,
and ``rlw`` draws its weights from a stream of its own that is rank 0's on every rank
(``routesurgeon.methods._rng``). The trainer then averages the gradients as for ``equal``.

``dwa`` and ``stch`` work per epoch: ``Trainer.fit_epoch`` calls ``method.end_epoch()`` at the
end of every epoch (call it yourself in your own loop). Their state (epoch loss sums and
averages, the epoch counter, STCH's nadir point) and ``rlw``'s random stream are in the method's
``state_dict``: a checkpoint, also one taken mid-epoch, resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from routesurgeon.errors import LossError
from routesurgeon.methods._rng import OwnRandomStream
from routesurgeon.methods.base import stack_losses
from routesurgeon.methods.baselines import ScalarizerMethod, _global_loss_values
from routesurgeon.methods.registry import register_method
from routesurgeon.precision import scaled

__all__ = ["DWAMethod", "GeometricMeanMethod", "LossValueScalarizer", "RLWMethod",
           "STCHMethod"]


class LossValueScalarizer(ScalarizerMethod):
    """A scalariser whose coefficients depend on the loss values: under torch.distributed it
    sees the global values (averaged over ranks) with this rank's gradients."""

    def scalarize(self, values: Tensor) -> Tensor:
        return self.scalarizer(values)

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        values = _global_loss_values(self, losses)
        loss = self.scalarize(values)
        scaled(loss, self.grad_scale).backward()
        return {"loss/total": float(loss.detach())}

    def _non_negative(self, values: Tensor) -> None:
        bad = [t for t, v in zip(self.tasks, values.detach().tolist(), strict=True) if v < 0]
        if bad:
            raise LossError(f"method {self.name!r} takes the logarithm of the task losses, but "
                            f"the losses of tasks {bad} are negative; use non-negative losses "
                            f"(e.g. cross-entropy, MSE) or another method")


def _to(v: Any, device: torch.device) -> Any:
    return v.to(device) if isinstance(v, Tensor) and v.device != device else v


@register_method("dwa")
class DWAMethod(LossValueScalarizer):
    """Dynamic Weight Average (Liu et al., "End-to-End Multi-Task Learning with Attention",
    CVPR 2019), via torchjd: ``lambda_k = K softmax_k(w_k / T)`` with ``w_k`` the ratio of task
    k's mean loss over the two previous epochs, uniform in the first two; temperature ``T = 2``
    (the paper's)."""

    scalarizer: Any

    def __init__(self, context: Any, temperature: float = 2.0) -> None:
        self.temperature = temperature
        super().__init__(context)

    def make_scalarizer(self, n_tasks: int) -> nn.Module:
        from torchjd.scalarization import DWA

        return DWA(temperature=self.temperature)

    def scalarize(self, values: Tensor) -> Tensor:
        d = self.scalarizer
        d._loss_sum = _to(d._loss_sum, values.device)  # restored from a checkpoint on the CPU
        d._previous_averages = [_to(v, values.device) for v in d._previous_averages]
        return d(values)

    def end_epoch(self) -> None:
        self.scalarizer.step()

    def state_dict(self) -> dict[str, Any]:
        d = self.scalarizer
        return {"loss_sum": None if d._loss_sum is None else d._loss_sum.clone(),
                "n_batches": d._n_batches,
                "previous": [v.clone() for v in d._previous_averages]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        d = self.scalarizer
        d._loss_sum = state["loss_sum"]
        d._n_batches = int(state["n_batches"])
        d._previous_averages = list(state["previous"])


@register_method("rlw")
class RLWMethod(ScalarizerMethod):
    """Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning", TMLR 2022), via torchjd: every step, weights ``softmax(z)``
    with ``z ~ N(0, I)`` (the paper's default distribution), drawn from the method's own stream."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.stream = OwnRandomStream(self.name)

    def make_scalarizer(self, n_tasks: int) -> nn.Module:
        from torchjd.scalarization import Random

        return Random()

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        values = stack_losses(self.tasks, losses)
        with self.stream.draws(values.device, self.reducer):
            loss = self.scalarizer(values)
        scaled(loss, self.grad_scale).backward()
        return {"loss/total": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


@register_method("geometric-mean")
class GeometricMeanMethod(LossValueScalarizer):
    """Geometric Loss Strategy (Chennupati et al., "MultiNet++", CVPR Workshops 2019), via
    torchjd: the geometric mean of the task losses, ``exp(mean_i log loss_i)``."""

    def make_scalarizer(self, n_tasks: int) -> nn.Module:
        from torchjd.scalarization import GeometricMean

        return GeometricMean()

    def scalarize(self, values: Tensor) -> Tensor:
        self._non_negative(values)
        return self.scalarizer(values)


@register_method("stch")
class STCHMethod(LossValueScalarizer):
    """Smooth Tchebycheff scalarisation (Lin et al., "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization", ICML 2024) in its multi-task form (the official STCH_MTL code):

    - epochs ``0 .. warmup_epochs``: the sum of the log losses, ``sum_i log(loss_i)``; the last of
      them (epoch ``warmup_epochs``) also averages the losses into the nadir point ``z``;
    - afterwards: ``T * STCH_mu(log(loss / z))`` with unit preferences, where torchjd's
      ``STCH(mu)`` is ``mu * logsumexp(f / mu)``.

    ``mu = 1.0`` and ``warmup_epochs = 4``: the official code's defaults (``STCH_mu``,
    ``STCH_warmup_epoch``). Runs of at most ``warmup_epochs + 1`` epochs never leave the warm-up.
    """

    def __init__(self, context: Any, mu: float = 1.0, warmup_epochs: int = 4) -> None:
        if mu <= 0 or warmup_epochs < 0:
            raise ValueError(f"stch: mu must be > 0 (got {mu}) and warmup_epochs >= 0 "
                             f"(got {warmup_epochs})")
        self.mu, self.warmup_epochs = mu, warmup_epochs
        super().__init__(context)
        self.epoch = 0
        self.loss_sum: Tensor | None = None
        self.n_batches = 0
        self.nadir: Tensor | None = None

    def make_scalarizer(self, n_tasks: int) -> nn.Module:
        from torchjd.scalarization import Sum

        return Sum()  # unused: the STCH scalarizer is built per call with unit preferences

    def scalarize(self, values: Tensor) -> Tensor:
        from torchjd.scalarization import STCH

        self._non_negative(values)
        if self.epoch <= self.warmup_epochs:
            if self.epoch == self.warmup_epochs:  # the nadir point: this epoch's mean losses
                v = values.detach()
                self.loss_sum = v.clone() if self.loss_sum is None else self.loss_sum + v
                self.n_batches += 1
            return torch.log(values + 1e-20).sum()
        if self.nadir is None:
            if self.loss_sum is None:
                raise LossError("stch: the warm-up epoch saw no batch, so there is no nadir "
                                "point; train at least one step in that epoch")
            self.nadir = self.loss_sum / self.n_batches
        nadir = self.nadir.to(values.device)
        stch = STCH(self.mu, weights=torch.ones_like(values))
        return len(self.tasks) * stch(torch.log(values / nadir + 1e-20))

    def end_epoch(self) -> None:
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        def c(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.clone()

        return {"epoch": self.epoch, "loss_sum": c(self.loss_sum), "n_batches": self.n_batches,
                "nadir": c(self.nadir)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.n_batches = int(state["epoch"]), int(state["n_batches"])
        self.loss_sum, self.nadir = state["loss_sum"], state["nadir"]
