"""What a ``Trainer`` watches while it trains: gradient conflicts and TensorBoard logging.

``Trainer(..., conflicts=..., log_dir=...)`` builds one :class:`Observer`; the trainer calls it at
fixed points (before and after a step, around an epoch, after ``evaluate``). It never changes
what is trained: conflict samples restore the buffers and the RNG and write no ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from routesurgeon import distributed as rsdist
from routesurgeon.conflicts import (
    ConflictConfig,
    Conflicts,
    LossFn,
    conflicts_of,
    measure_conflicts,
    shared_layers,
)
from routesurgeon.errors import InputError

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon
    from routesurgeon.tensorboard import TensorBoardLogger
    from routesurgeon.trainer import Trainer

__all__ = ["ConflictMonitor", "Observer", "make_monitor"]


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


class ConflictMonitor:
    """Samples :func:`measure_conflicts` during training (the ``Trainer`` drives it).

    ``samples`` holds every measurement (``Conflicts``); ``take_epoch()`` returns and clears the
    records of the current epoch (what ``fit_epoch`` stores in the history).
    """

    def __init__(self, surgeon: Surgeon, config: ConflictConfig) -> None:
        self.surgeon = surgeon
        self.config = config
        self.every = config.interval(len(surgeon.tasks))  # steps between samples
        self.layers = shared_layers(surgeon)
        self.samples: list[Conflicts] = []
        self._epoch_records: list[dict[str, Any]] = []
        self._drawn = 0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, inputs: Any, targets: Mapping[str, Any], loss_fns: Mapping[str, LossFn],
                step: int, epoch: int) -> Conflicts:
        c = measure_conflicts(self.surgeon, [(inputs, targets)], loss_fns, layers=self.layers,
                              reduce=self._reduce(), step=step, epoch=epoch)
        self.samples.append(c)
        self._epoch_records.append(c.as_record())
        return c

    def measure_fn(self, compute: Callable[[], Mapping[str, Tensor]], step: int, epoch: int
                   ) -> Conflicts:
        """Measure on the losses ``compute()`` returns (one batch's forward)."""
        c = conflicts_of(self.surgeon, [compute], layers=self.layers, reduce=self._reduce(),
                         step=step, epoch=epoch)
        self.samples.append(c)
        self._epoch_records.append(c.as_record())
        return c

    @staticmethod
    def _reduce() -> Callable[[Sequence[Tensor]], None] | None:
        if not rsdist.is_distributed():
            return None

        def reduce(ts: Sequence[Tensor]) -> None:
            rsdist.all_reduce_mean(ts, kind="conflicts")

        return reduce

    def maybe_measure(self, inputs: Any, targets: Mapping[str, Any],
                      loss_fns: Mapping[str, LossFn], step: int, epoch: int) -> Conflicts | None:
        """Measure on this batch when ``step`` is a sampled one."""
        if not self.due(step):
            return None
        return self.measure(inputs, targets, loss_fns, step, epoch)

    def sampled(self, loader: Iterable[Any], loss_fns: Mapping[str, LossFn],
                position: Callable[[], tuple[int, int]],
                on_sample: Callable[[Conflicts], None] | None = None) -> Iterable[Any]:
        """``loader`` unchanged, measuring on every ``every``-th batch drawn from it (for
        per-epoch methods, which draw their batches themselves); ``position()`` gives the
        (step, epoch) to record, ``on_sample`` sees each measurement."""
        monitor = self

        class _Sampled:
            def __iter__(self) -> Iterator[Any]:
                for batch in loader:
                    if monitor._drawn % monitor.every == 0:
                        inputs, targets = batch
                        step, epoch = position()
                        c = monitor.measure(inputs, targets, loss_fns, step, epoch)
                        if on_sample is not None:
                            on_sample(c)
                    monitor._drawn += 1
                    yield batch

            def __len__(self) -> int:
                return len(loader)  # type: ignore[arg-type]

        return _Sampled()

    def take_epoch(self) -> list[dict[str, Any]]:
        out, self._epoch_records = self._epoch_records, []
        return out


def make_monitor(surgeon: Surgeon, conflicts: ConflictConfig | bool | int | None,
                 default_on: bool = False) -> ConflictMonitor | None:
    """The monitor a ``Trainer(conflicts=...)`` option asks for: ``True`` (default sampling),
    an int (every that many steps), a ``ConflictConfig``, ``False`` (off) or ``None`` (on with the
    default sampling when ``default_on``, i.e. when TensorBoard logging is on)."""
    if conflicts is None:
        conflicts = default_on
    if conflicts is False:
        return None
    if conflicts is True:
        cfg = ConflictConfig()
    elif isinstance(conflicts, int):
        cfg = ConflictConfig(every=conflicts)
    elif isinstance(conflicts, ConflictConfig):
        cfg = conflicts
    else:
        raise InputError(f"conflicts must be True, False, None, a step interval (int) or a "
                         f"ConflictConfig, got {type(conflicts).__name__}")
    monitor = ConflictMonitor(surgeon, cfg)
    if not monitor.layers:
        return None  # nothing is shared: nothing can conflict
    return monitor
