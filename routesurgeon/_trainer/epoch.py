"""The epoch loop of ``Trainer`` (resumable mid-epoch) and evaluation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from routesurgeon import checkpoint as ckpt
from routesurgeon import distributed as rsdist
from routesurgeon._trainer.nonfinite import LossFn, _check_loss_fns
from routesurgeon._trainer.state import TrainerState
from routesurgeon.errors import CheckpointError

__all__ = ["TrainerEpoch"]


class TrainerEpoch(TrainerState):
    """``fit_epoch`` (per-step or per-epoch methods) and ``evaluate``."""

    # -- epoch-level API -----------------------------------------------------------------------
    def fit_epoch(self, loader: Iterable[Any], loss_fns: Mapping[str, LossFn],
                  checkpoint: str | None = None, checkpoint_every: int | None = None,
                  on_step: Callable[[int, dict[str, float]], None] | None = None
                  ) -> dict[str, Any]:
        """One epoch of the method (a per-epoch method runs all its passes); returns its record.

        With ``checkpoint``, the run is saved there at the end of the epoch and, for per-step
        methods, every ``checkpoint_every`` steps; a trainer resumed from a mid-epoch checkpoint
        continues the epoch where it stopped. Exact continuation needs a loader whose batch
        order depends only on the RNG state when it is iterated (a list, or a ``DataLoader`` with
        its default generator): the RNG state at the start of the epoch is saved, restored to
        re-create the iterator, the finished batches are drawn again and dropped.
        """
        _check_loss_fns(self.surgeon.tasks, loss_fns)
        t0 = time.perf_counter()
        skipped0 = self._progress["skipped0"] if self._progress else self.skipped
        fit = getattr(self.method, "fit_epoch", None)
        if fit is not None:
            if self._progress is not None:
                raise CheckpointError(f"a mid-epoch checkpoint cannot resume the per-epoch "
                                      f"method {self.method_name!r}")
            record = fit(self, self.observer.epoch_loader(loader, loss_fns), loss_fns)
        else:
            record = self._fit_steps(loader, loss_fns, checkpoint, checkpoint_every, on_step,
                                     skipped0)
        record.update(epoch=self.epoch, method=self.method_name, time=time.perf_counter() - t0,
                      skipped=self.skipped, skipped_epoch=self.skipped - skipped0)
        if self.surgeon.importance_bank.trained:
            record["importance"] = {
                layer: {t: float(v.mean()) for t, v in per.items()}
                for layer, per in self.surgeon.importance().items()
            }
        self.sync_buffers()
        end_epoch = getattr(self.method, "end_epoch", None)
        if end_epoch is not None:  # the method's per-epoch statistics (DWA, STCH), every rank
            end_epoch()
        self.observer.end_epoch(record)
        self.history.append(record)
        self.epoch += 1
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        return record

    def _fit_steps(self, loader: Iterable[Any], loss_fns: Mapping[str, LossFn],
                   checkpoint: str | None, every: int | None,
                   on_step: Callable[[int, dict[str, float]], None] | None,
                   skipped0: int) -> dict[str, Any]:
        prog = self._progress
        self._progress = None
        if prog is None:
            epoch_rng = ckpt.rng_state()
            start, n, sums = 0, 0, {}
            it = iter(loader)
        else:
            now = ckpt.rng_state()
            epoch_rng, start, n, sums = prog["epoch_rng"], prog["batch"], prog["n"], prog["sums"]
            ckpt.set_rng_state(epoch_rng)
            it = iter(loader)
            for _ in range(start):
                next(it)
            ckpt.set_rng_state(now)
        for b, (inputs, targets) in enumerate(self._bar(it, self.method_name), start):
            stats = self.train_step(inputs, targets, loss_fns)
            if stats is not None:
                n += 1
                for t in self.surgeon.tasks:
                    sums[t] = sums.get(t, 0.0) + stats[f"loss/{t}"]
                if on_step is not None:
                    on_step(self.step_count, stats)
            if checkpoint is not None and every and (b + 1) % every == 0:
                self._progress = {"epoch_rng": epoch_rng, "batch": b + 1, "n": n,
                                  "sums": dict(sums), "skipped0": skipped0}
                self.save_checkpoint(checkpoint)
                self._progress = None
        return {"losses": {t: v / max(n, 1) for t, v in sums.items()}, "passes": 1, "steps": n}

    def _bar(self, loader: Iterable[Any], desc: str) -> Iterable[Any]:
        if not self.progress or rsdist.rank() != 0:
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
                with self.autocast():
                    outs = self.task_outputs(self.surgeon.task_forward(*args))
                b = len(next(iter(targets.values())))
                for t, fn in metric_fns.items():
                    totals[t] = totals.get(t, 0.0) + float(fn(outs[t], targets[t])) * b
                count += b
        finally:
            self.surgeon.train(was)
        result = {t: v / max(count, 1) for t, v in totals.items()}
        self.observer.after_evaluate(result)
        if self.history:
            self.history[-1].setdefault("metrics", {}).update(
                {t: {"metric": v} for t, v in result.items()})
        return result
