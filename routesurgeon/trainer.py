"""``Trainer``: run any registered method on an instrumented model, in your loop or in one call.

Per-step methods (the baselines and ``drmgf-step``) expose ``trainer.forward`` /
``trainer.backward(losses)`` for users who keep their own loop; ``fit_epoch`` runs a whole epoch
with a progress bar for every method, including the per-epoch reference ``drmgf``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from routesurgeon.errors import LossError
from routesurgeon.methods.registry import get_method_class
from routesurgeon.outputs import leaf_values
from routesurgeon.surgeon import Surgeon

__all__ = ["Trainer", "check_losses"]

LossFn = Callable[[Tensor, Any], Tensor]


def check_losses(tasks: list[str], losses: Mapping[str, Tensor]) -> list[str]:
    """Validate a losses dict; return the tasks whose loss is not finite."""
    missing = [t for t in tasks if t not in losses]
    unknown = [k for k in losses if k not in tasks]
    if unknown:
        raise LossError(f"losses for unknown tasks {unknown}; tasks are {tasks}")
    if missing:
        raise LossError(f"losses missing for tasks {missing}; every task needs a loss: {tasks}")
    bad = []
    for t in tasks:
        v = losses[t]
        if not isinstance(v, Tensor) or v.dim() != 0:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise LossError(f"loss of task {t!r} must be a scalar tensor, got {shape}; "
                            f"reduce it (e.g. .mean()) first")
        if not torch.isfinite(v.detach()).item():
            bad.append(t)
    return bad


class Trainer:
    """Train ``surgeon`` with ``method`` (a registered name; see ``available_methods()``)."""

    def __init__(
        self,
        surgeon: Surgeon,
        optimizer: torch.optim.Optimizer,
        method: str = "drmgf-step",
        config: Mapping[str, Any] | None = None,
        importance_optimizer: torch.optim.Optimizer | None = None,
        max_nonfinite: int = 5,
        progress: bool = True,
    ) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in surgeon.model.named_parameters()
                   if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} of the model's parameters (e.g. "
                f"{missing[:3]}); build it with surgeon.model_parameters()"
            )
        self.surgeon = surgeon
        self.optimizer = optimizer
        cls = get_method_class(method)
        self.method = cls(surgeon, **dict(config or {}))
        self.method_name = cls.name  # type: ignore[attr-defined]
        extra = list(self.method.parameters())
        if extra:
            self.optimizer.add_param_group({"params": extra})
        self.importance_optimizer = importance_optimizer
        self.max_nonfinite = max_nonfinite
        self.progress = progress
        self.history: list[dict[str, Any]] = []
        self.skipped = 0
        self._consecutive_bad = 0
        self.epoch = 0
        self.step_count = 0

    # -- step-level API ------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's outputs (through the method's forward when it needs one)."""
        fwd = getattr(self.method, "forward", None)
        return fwd(*args, **kwargs) if fwd is not None else self.surgeon(*args, **kwargs)

    def task_outputs(self, outputs: Any) -> dict[str, Tensor]:
        spec = self.surgeon.outputs
        values = leaf_values(outputs, spec.task_outputs)
        return {t: values[o] for t, o in zip(spec.tasks, spec.task_outputs)}

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float] | None:
        """The method's gradients into ``.grad``; ``None`` (and nothing written) on a bad step."""
        bad = check_losses(self.surgeon.tasks, losses)
        if bad:
            return self._skip(f"non-finite loss for tasks {bad}")
        stats = self.method.backward(losses)
        bad_params = [n for n, p in self.surgeon.model.named_parameters()
                      if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad_params:
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(f"non-finite gradient in {bad_params[:3]}")
        self._consecutive_bad = 0
        return stats

    def _skip(self, why: str) -> None:
        self.skipped += 1
        self._consecutive_bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self._consecutive_bad >= self.max_nonfinite:
            raise LossError(f"{self._consecutive_bad} consecutive steps skipped; last: {why}. "
                            f"Lower the learning rate or check the data and loss functions.")
        return None

    def train_step(self, inputs: Any, targets: Mapping[str, Any],
                   loss_fns: Mapping[str, LossFn]) -> dict[str, float] | None:
        self.surgeon.train()
        self.optimizer.zero_grad(set_to_none=True)
        args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        outs = self.task_outputs(self.forward(*args))
        losses = {t: loss_fns[t](outs[t], targets[t]) for t in self.surgeon.tasks}
        stats = self.backward(losses)
        if stats is None:
            return None
        self.optimizer.step()

        def recompute() -> dict[str, Tensor]:
            outs = self.task_outputs(self.forward(*args))
            return {t: loss_fns[t](outs[t], targets[t]) for t in self.surgeon.tasks}

        self.method.after_step({k: v.detach() for k, v in losses.items()}, recompute=recompute)
        self.step_count += 1
        return {**stats, **{f"loss/{t}": float(v.detach()) for t, v in losses.items()}}

    # -- epoch-level API -----------------------------------------------------------------------
    def fit_epoch(self, loader: Iterable[Any], loss_fns: Mapping[str, LossFn]) -> dict[str, Any]:
        """One epoch of the method (a per-epoch method runs all its passes); returns its record."""
        unknown = [k for k in loss_fns if k not in self.surgeon.tasks]
        missing = [t for t in self.surgeon.tasks if t not in loss_fns]
        if unknown or missing:
            raise LossError(f"loss_fns must name every task exactly: missing {missing}, "
                            f"unknown {unknown}; tasks are {self.surgeon.tasks}")
        t0 = time.perf_counter()
        fit = getattr(self.method, "fit_epoch", None)
        if fit is not None:
            record = fit(self, loader, loss_fns)
        else:
            record = self._fit_steps(loader, loss_fns)
        record.update(epoch=self.epoch, method=self.method_name, time=time.perf_counter() - t0,
                      skipped=self.skipped)
        if self.surgeon.importance_bank.trained:
            record["importance"] = {
                layer: {t: float(v.mean()) for t, v in per.items()}
                for layer, per in self.surgeon.importance().items()
            }
        self.history.append(record)
        self.epoch += 1
        return record

    def _fit_steps(self, loader: Iterable[Any], loss_fns: Mapping[str, LossFn]) -> dict[str, Any]:
        sums: dict[str, float] = {}
        n = 0
        for inputs, targets in self._bar(loader, self.method_name):
            stats = self.train_step(inputs, targets, loss_fns)
            if stats is None:
                continue
            n += 1
            for t in self.surgeon.tasks:
                sums[t] = sums.get(t, 0.0) + stats[f"loss/{t}"]
        return {"losses": {t: v / max(n, 1) for t, v in sums.items()}, "passes": 1, "steps": n}

    def _bar(self, loader: Iterable[Any], desc: str) -> Iterable[Any]:
        if not self.progress:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"epoch {self.epoch} {desc}", leave=False)

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any],
                 metric_fns: Mapping[str, Callable[[Tensor, Any], float]]) -> dict[str, float]:
        """Mean of each task's metric over ``loader`` in eval mode (batch-size weighted)."""
        was = self.surgeon.training
        self.surgeon.eval()
        totals: dict[str, float] = {}
        count = 0
        try:
            for inputs, targets in loader:
                args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
                outs = self.task_outputs(self.surgeon(*args))
                b = len(next(iter(targets.values())))
                for t, fn in metric_fns.items():
                    totals[t] = totals.get(t, 0.0) + float(fn(outs[t], targets[t])) * b
                count += b
        finally:
            self.surgeon.train(was)
        result = {t: v / max(count, 1) for t, v in totals.items()}
        if self.history:
            self.history[-1].setdefault("metrics", {}).update(
                {t: {"metric": v} for t, v in result.items()})
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step_count, "skipped": self.skipped,
                "history": self.history, "method": self.method.state_dict()}

