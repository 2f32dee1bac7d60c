"""``--checkpoint PATH`` (export, viz): a ``Trainer.save_checkpoint`` file loaded into the
instrumented model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routesurgeon.errors import InputError


def _check_file(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise InputError(f"--checkpoint {path!r} is not a file")


def _apply_checkpoint(surgeon: Any, path: str) -> list[dict[str, Any]]:
    """Load a ``Trainer.save_checkpoint`` file's weights and importance; return its history."""
    from routesurgeon import checkpoint as ckpt

    _check_file(path)
    header = ckpt.read_header(path)
    bank = surgeon.importance_bank
    _, payload = ckpt.read_payload(
        path,
        fingerprint=ckpt.fingerprint(surgeon.model, bank),
        tasks=surgeon.tasks,
        method=header.method,
    )
    surgeon.model.load_state_dict(payload["model"])
    bank.load_state_dict(payload["bank"])
    bank.trained = bool(payload["bank_trained"])
    return list(payload["trainer"]["history"])
