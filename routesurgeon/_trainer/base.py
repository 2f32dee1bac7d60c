"""The attributes every part of ``Trainer`` relies on, and which parameters are trained."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from routesurgeon import compile as rscompile
from routesurgeon import distributed as rsdist
from routesurgeon import precision as rsprec
from routesurgeon._trainer.nonfinite import LossFn
from routesurgeon.surgeon import Surgeon

if TYPE_CHECKING:
    from routesurgeon.observe import Observer

__all__ = ["TrainerBase"]


class TrainerBase:
    """What ``Trainer.__init__`` sets (declared for the parts), and the trained parameters."""

    surgeon: Surgeon
    optimizer: torch.optim.Optimizer
    method: Any
    method_name: str
    importance_optimizer: torch.optim.Optimizer | None
    precision: rsprec.Precision
    scaler: Any
    overflow_skipped: int
    _unscaled: bool
    compile: rscompile.CompileConfig | None
    _compiled: dict[int, Any]
    max_nonfinite: int
    progress: bool
    history: list[dict[str, Any]]
    skipped: int
    _consecutive_bad: int
    epoch: int
    step_count: int
    comm: rsdist.CommStats
    _progress: dict[str, Any] | None
    _batch: tuple[tuple[Any, ...], Mapping[str, Any], Mapping[str, LossFn]] | None
    _global_losses: dict[str, float] | None
    _sync_grads: bool
    observer: Observer

    # -- what is trained -------------------------------------------------------------------------
    def optimizer_params(self) -> list[nn.Parameter]:
        """Every parameter the model optimizer (and the importance optimizer) steps."""
        opts = [self.optimizer] + ([self.importance_optimizer] if self.importance_optimizer
                                   else [])
        seen: set[int] = set()
        out = []
        for opt in opts:
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out

    def _param_names(self) -> dict[int, str]:
        names = {id(p): n for n, p in self.surgeon.model.named_parameters()}
        for n, p in self.surgeon.importance_bank.named_parameters():
            names.setdefault(id(p), f"importance_bank.{n}")
        for i, p in enumerate(self.method.parameters()):
            names.setdefault(id(p), f"{self.method_name}.param{i}")
        return names
