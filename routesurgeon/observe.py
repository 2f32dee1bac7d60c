"""What a ``Trainer`` watches while it trains: gradient conflicts and TensorBoard logging.

``Trainer(..., conflicts=..., log_dir=...)`` builds one :class:`Observer`; the trainer calls it at
fixed points (before and after a step, around an epoch, after ``evaluate``). It never changes
what is trained: conflict samples restore the buffers and the RNG and write no ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routesurgeon import distributed as rsdist
from routesurgeon.conflicts import ConflictConfig, ConflictMonitor, Conflicts, make_monitor

if TYPE_CHECKING:
    from routesurgeon.tensorboard import TensorBoardLogger
    from routesurgeon.trainer import Trainer

__all__ = ["Observer"]


class Observer:
    """The trainer's conflict monitor (``monitor``) and TensorBoard logger (``tb``), either
    of which may be ``None``."""

    def __init__(self, trainer: Trainer, conflicts: ConflictConfig | bool | int | None = None,
                 log_dir: str | Path | None = None) -> None:
        self.trainer = trainer
        self.monitor: ConflictMonitor | None = make_monitor(
            trainer.surgeon, conflicts, default_on=log_dir is not None)
        self.tb: TensorBoardLogger | None = None
        if log_dir is not None and rsdist.rank() == 0:
            from routesurgeon.tensorboard import TensorBoardLogger

            self.tb = TensorBoardLogger(log_dir, trainer.surgeon)
        self._measured_at = -1

    @property
    def samples(self) -> list[Conflicts]:
        """Every conflict measurement so far."""
        return self.monitor.samples if self.monitor is not None else []

    def _on_sample(self, c: Conflicts) -> None:
        if self.tb is not None:
            self.tb.log_conflicts(c, c.step or 0)

    def before_step(self, args: Sequence[Any], targets: Mapping[str, Any],
                    loss_fns: Mapping[str, Callable[..., Any]]) -> None:
        """Sample the conflicts on this batch at the pre-step weights when the step is due."""
        m, tr = self.monitor, self.trainer
        if m is None or tr.step_count == self._measured_at or not m.due(tr.step_count):
            return
        self._measured_at = tr.step_count  # a skipped step does not measure twice
        self._on_sample(m.measure(tuple(args), targets, loss_fns, tr.step_count, tr.epoch))

    def before_step_fn(self, compute: Callable[[], Mapping[str, Any]]) -> None:
        """As :meth:`before_step`, the losses computed by ``compute()`` (a Lightning step)."""
        m, tr = self.monitor, self.trainer
        if m is None or tr.step_count == self._measured_at or not m.due(tr.step_count):
            return
        self._measured_at = tr.step_count
        self._on_sample(m.measure_fn(compute, tr.step_count, tr.epoch))

    def after_step(self, stats: Mapping[str, Any]) -> None:
        if self.tb is not None:
            self.tb.log_step(self.trainer.step_count, stats)

    def epoch_loader(self, loader: Iterable[Any], loss_fns: Mapping[str, Callable[..., Any]]
                     ) -> Iterable[Any]:
        """For a per-epoch method: its loader, sampled every ``every`` batches it draws."""
        if self.monitor is None:
            return loader
        tr = self.trainer
        return self.monitor.sampled(loader, loss_fns, lambda: (tr.step_count, tr.epoch),
                                    self._on_sample)

    def end_epoch(self, record: dict[str, Any]) -> None:
        """Store the epoch's conflict samples in its record; log the epoch."""
        if self.monitor is not None:
            record["conflicts"] = self.monitor.take_epoch()
        if self.tb is not None:
            self.tb.log_epoch(self.trainer.epoch, record)

    def after_evaluate(self, metrics: Mapping[str, Any]) -> None:
        if self.tb is not None:
            self.tb.log_metrics(max(self.trainer.epoch - 1, 0), metrics)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
