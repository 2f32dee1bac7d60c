"""Data-parallel training without DDP wrappers: the ``Trainer`` detects a process group.

When ``torch.distributed`` is initialised, the ``Trainer`` (not ``DistributedDataParallel``)
keeps ranks in step: at construction it broadcasts rank 0's model, importance variables and method
parameters; every step it all-reduces the task losses (T floats, so every rank skips the same
non-finite steps and logs the global loss), then synchronises the method's gradient in one of two
ways, which the method declares (``sync_mode``):

- ``"gradients"``: the method's gradient is linear in the per-task gradients once its loss-derived
  coefficients are global (``equal``, ``uncertainty``, ``famo``, ``imta-ge``, ``drmgf``,
  ``drmgf-step``, ``dwa``, ``rlw``, ``stch``, ``geometric-mean``): one flat all-reduce of the
  *fused gradients* of every parameter the optimizers hold, plus the importance variables when
  the method updates them in its backward.
- ``"jacobian"``: a non-linear aggregator (``pcgrad``, ``cagrad``, ``nash-mtl``, ``upgrad``,
  ``mgda``, ``imtl-g`` and those of ``methods/aggregators.py``): the method all-reduces its T x
  shared-parameter Jacobian (and the exclusive parameters' gradients) once per step through the
  reducer the trainer installs, then aggregates identically on every rank; nothing else is
  reduced.

Each rank must see an equal share of the global batch (the losses are means): the result then
equals one process on the global batch, up to float rounding. See ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SYNC_MODES",
    "CommStats",
    "all_reduce_mean",
    "broadcast_tensors",
    "is_distributed",
    "rank",
    "shard",
    "sync_mode",
    "world_size",
]

SYNC_MODES = ("gradients", "jacobian")



def sync_mode(method: Any) -> str | None:
    """How ranks are kept exact for ``method``: ``"gradients"`` (the trainer averages ``.grad``),
    ``"jacobian"`` (the method averages its per-task gradients through its ``reducer``), or
    ``None`` (unknown: the trainer refuses it under a process group). A method declares it with a
    ``data_parallel`` class attribute."""
    mode = getattr(method, "data_parallel", None)
    if mode is not None and mode not in SYNC_MODES:
        raise ValueError(f"{type(method).__name__}.data_parallel is {mode!r}; use one of "
                         f"{SYNC_MODES} (or None to refuse process groups)")
    return mode


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class CommStats:
    """Bytes and calls this process sent through ``all_reduce`` / ``broadcast``, in total and by
    kind (``broadcast``, ``losses``, ``gradients``, ``jacobian``, ``method``)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self.by_kind: dict[str, int] = {}

    def add(self, tensor: Tensor, kind: str = "other") -> None:
        n = tensor.numel() * tensor.element_size()
        self.bytes += n
        self.calls += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n


def all_reduce_mean(tensors: Sequence[Tensor], stats: CommStats | None = None,
                    kind: str = "gradients") -> None:
    """Average ``tensors`` in place over ranks with one flat all-reduce per dtype."""
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    n = dist.get_world_size()
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        if stats is not None:
            stats.add(flat, kind)
        flat /= n
        offset = 0
        for t in group:
            k = t.numel()
            t.copy_(flat[offset:offset + k].view_as(t))
            offset += k


def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0,
                      stats: CommStats | None = None) -> None:
    """Copy rank ``src``'s values of ``tensors`` to every rank (one flat broadcast per dtype)."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src)
        if stats is not None:
            stats.add(flat, "broadcast")
        offset = 0
        with torch.no_grad():
            for t in group:
                k = t.numel()
                t.copy_(flat[offset:offset + k].view_as(t))
                offset += k


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(batch: Any, rank_: int | None = None, world: int | None = None) -> Any:
    """This rank's equal share of a global batch (tensors split along dim 0; dicts/tuples kept)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if isinstance(batch, Tensor):
        if batch.shape[0] % w:
            raise ValueError(f"global batch of {batch.shape[0]} does not split into {w} equal "
                             f"shares; the result would not equal one process on the global batch")
        k = batch.shape[0] // w
        return batch[r * k:(r + 1) * k]
    if isinstance(batch, dict):
        return {key: shard(v, r, w) for key, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(v, r, w) for v in batch)
    return batch
