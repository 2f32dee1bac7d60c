"""The recipes under ``torchrun``: the process group, rank 0's output, equal shares of every batch,
and the all-reduces the single-task baselines and route fine-tuning need (see ``harness``)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from routesurgeon import distributed as rsdist

if TYPE_CHECKING:
    from harness import RunConfig

_SCRATCH: list[Path] = []  # the private output directory of a rank other than 0


def init_distributed() -> int:
    """Initialise the process group once when launched by ``torchrun`` with more than one process
    (``WORLD_SIZE`` > 1); return the world size (1 in a plain run).

    The harness trains on CPU, so gloo carries its tensors; with CUDA available the group is
    ``cpu:gloo,cuda:nccl`` (CUDA tensors would go through nccl). Ranks other than 0 print
    nothing (stdout to /dev/null; errors still reach stderr). The group is destroyed at exit.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(_finish_distributed)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return dist.get_world_size()


def _finish_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for path in _SCRATCH:
        shutil.rmtree(path, ignore_errors=True)


def _scratch_dir() -> Path:
    """A rank > 0's own output directory: what a recipe writes there is thrown away at exit."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix=f"routesurgeon-rank{rsdist.rank()}-")))
    return _SCRATCH[0]


def distributed_info(cfg: RunConfig) -> dict[str, Any]:
    """What ``results.json`` records about the process group (world size 1 in a plain run)."""
    world = rsdist.world_size()
    info: dict[str, Any] = {"world_size": world}
    if world > 1:
        info.update(backend=str(dist.get_backend()), per_rank_batch=cfg.batch_size // world,
                    batchnorm="train-mode BatchNorm normalises with each rank's share of the "
                              "batch (per-shard statistics; SyncBatchNorm needs GPUs); running "
                              "statistics are averaged over ranks after each epoch")
    return info


def distributed_header(cfg: RunConfig) -> str:
    """The line ``results.md`` and the console start with when the run has several processes."""
    world = rsdist.world_size()
    if world == 1:
        return ""
    return (f"Distributed: {world} processes ({dist.get_backend()}), each trains on 1/{world} of "
            f"every global batch of {cfg.batch_size} (gradients averaged: equal to one process "
            f"up to float rounding), except that BatchNorm in train mode uses per-shard "
            f"statistics ({cfg.batch_size // world} samples; SyncBatchNorm needs GPUs). A global "
            f"batch that does not split into {world} equal shares loses its last samples.\n")


class Sharded:
    """This rank's equal share of every global batch of ``batches``; a global batch whose size is
    not a multiple of the world size first loses its last ``size % world`` samples (equal
    shares keep the averaged gradient equal to the trimmed global batch's)."""

    def __init__(self, batches: Collection[tuple[Tensor, dict[str, Tensor]]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        world = rsdist.world_size()
        for x, ys in self.batches:
            keep = len(x) - len(x) % world
            if keep:
                yield rsdist.shard((x[:keep], {t: y[:keep] for t, y in ys.items()}))


def replicate(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (a no-op in one process)."""
    rsdist.broadcast_tensors([t for t in model.state_dict().values() if t.is_floating_point()])


def average_gradients(model: nn.Module) -> None:
    """Average ``.grad`` over ranks in one all-reduce (a no-op in one process)."""
    rsdist.all_reduce_mean([p.grad for p in model.parameters() if p.grad is not None])


def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks."""
    rsdist.all_reduce_mean([b for b in model.buffers() if b.is_floating_point()])
