"""Checkpoints of ``Trainer``: its state dict, saved and restored (``routesurgeon.checkpoint``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from routesurgeon import checkpoint as ckpt
from routesurgeon import distributed as rsdist
from routesurgeon._trainer.step import TrainerStep

__all__ = ["TrainerState"]


class TrainerState(TrainerStep):
    """``state_dict`` / ``load_state_dict`` and ``save_checkpoint`` / ``load_checkpoint``."""

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (see ``save_checkpoint``)."""
        bank = self.surgeon.importance_bank
        return {
            "model": self.surgeon.model.state_dict(),
            "bank": bank.state_dict(), "bank_trained": bank.trained,
            "optimizer": self.optimizer.state_dict(),
            "importance_optimizer": (self.importance_optimizer.state_dict()
                                     if self.importance_optimizer is not None else None),
            "method": self.method.state_dict(),
            "trainer": {"epoch": self.epoch, "step": self.step_count, "skipped": self.skipped,
                        "consecutive_bad": self._consecutive_bad, "history": self.history},
            "progress": self._progress,
            "rng": ckpt.rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        bank = self.surgeon.importance_bank
        self.surgeon.model.load_state_dict(state["model"])
        bank.load_state_dict(state["bank"])
        bank.trained = bool(state["bank_trained"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.importance_optimizer is not None and state["importance_optimizer"] is not None:
            self.importance_optimizer.load_state_dict(state["importance_optimizer"])
        self.method.load_state_dict(state["method"])
        tr = state["trainer"]
        self.epoch, self.step_count, self.skipped = tr["epoch"], tr["step"], tr["skipped"]
        self._consecutive_bad = tr["consecutive_bad"]
        self.history = list(tr["history"])
        self._progress = state["progress"]
        ckpt.set_rng_state(state["rng"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def _fingerprint(self) -> list[Any]:
        return ckpt.fingerprint(self.surgeon.model, self.surgeon.importance_bank)

    def save_checkpoint(self, path: str) -> ckpt.Header | None:
        """Write the run to ``path`` atomically (rank 0 only under torch.distributed).

        Saved: model weights and buffers, importance variables and meta scales, the method's
        state, the optimizers' state, epoch/step, skipped-step counts, history, the torch/numpy/
        Python RNG states and, inside ``fit_epoch``, the position in the epoch.
        """
        header = None
        if rsdist.rank() == 0:
            header = ckpt.write(path, self.state_dict(), fingerprint=self._fingerprint(),
                                tasks=self.surgeon.tasks, method=self.method_name,
                                epoch=self.epoch, step=self.step_count,
                                world_size=rsdist.world_size())
        rsdist.barrier()
        return header

    def load_checkpoint(self, path: str) -> ckpt.Header:
        """Restore the run saved at ``path`` (refused unless of this model, tasks and method).

        Checkpoints are world-size independent: every rank reads the same file.
        """
        header, payload = ckpt.read_payload(path, fingerprint=self._fingerprint(),
                                            tasks=self.surgeon.tasks, method=self.method_name)
        self.load_state_dict(payload)
        return header
