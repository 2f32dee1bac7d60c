"""Mixed precision for the ``Trainer``: autocast and loss scaling, by Lightning-style name.

``Trainer(..., precision="bf16")`` runs the forward and the losses under ``torch.autocast`` in
bfloat16; ``precision="fp16"`` autocasts to float16 and scales the losses with a
``torch.amp.GradScaler`` (the trainer makes one unless ``scaler=`` is given). Parameters, their
gradients, the importance variables and the optimizers stay in float32; backward passes run
outside autocast.

Loss scaling is done by the methods, not by the trainer: each built-in method multiplies what it
back-propagates by ``method.grad_scale`` at the point where it is linear (after FAMO's logarithm,
after the uncertainty weighting, on each task loss of ``drmgf-step``), unscales what is not a
gradient (``drmgf-step``'s Taylor importance) and aggregates the per-task gradients of the
torchjd aggregators unscaled (Nash-MTL is not scale-invariant). A method declares that it does
so with ``supports_loss_scale = True``; one that does not is refused under ``fp16``.

Non-finite scaled gradients are the scaler's business: the step is skipped and the scale lowered
(``Trainer.overflow_skipped`` counts them), not counted as a skipped step of the numerical guard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from routesurgeon.errors import PrecisionError

__all__ = ["PRECISIONS", "Precision", "resolve_precision"]

#: accepted names -> canonical name ("32", "bf16", "fp16"); Lightning's strings are accepted
PRECISIONS = {
    "32": "32", "32-true": "32", "fp32": "32", "float32": "32",
    "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "float16": "fp16",
}
_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: canonical ``name`` and the device type autocast runs on."""

    name: str  # "32" | "bf16" | "fp16"
    device_type: str  # "cpu", "cuda", ...

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (``None`` in full precision)."""
        return _DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.dtype is not None

    @property
    def scaled(self) -> bool:
        """Whether the losses are scaled (float16 needs it; bfloat16 has float32's range)."""
        return self.name == "fp16"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast`` in this precision (a no-op in full precision)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield


def resolve_precision(precision: str | int, device: torch.device) -> Precision:
    """The ``Precision`` named ``precision`` on ``device``; a ``PrecisionError`` when the name
    is unknown or the device cannot autocast to it."""
    key = str(precision).lower()
    if key not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; use '32', 'bf16' or 'fp16' "
                             f"(or Lightning's '32-true', 'bf16-mixed', '16-mixed')")
    name = PRECISIONS[key]
    dev = device.type
    if name != "32":
        if not torch.amp.autocast_mode.is_autocast_available(dev):
            raise PrecisionError(f"precision={precision!r}: torch.autocast is not available on "
                                 f"device {dev!r}; train in precision='32'")
        if (name == "bf16" and dev == "cuda" and torch.cuda.is_available()
                and not torch.cuda.is_bf16_supported()):
            raise PrecisionError(f"precision={precision!r}: this GPU "
                                 f"({torch.cuda.get_device_name(device)}) has no bfloat16 "
                                 f"support; use precision='fp16'")
    return Precision(name, dev)


def check_scaler(precision: Precision, scaler: Any) -> Any:
    """The ``GradScaler`` to use: ``scaler`` (fp16 only) or a new one for fp16, else ``None``."""
    if scaler is not None and not precision.scaled:
        raise PrecisionError(f"a GradScaler was given with precision={precision.name!r}: loss "
                             f"scaling is for precision='fp16' (bfloat16 and float32 have the "
                             f"range they need); drop scaler= or use precision='fp16'")
    if not precision.scaled:
        return None
    if scaler is None:
        return torch.amp.GradScaler(precision.device_type)
    if not isinstance(scaler, torch.amp.GradScaler):
        raise PrecisionError(f"scaler must be a torch.amp.GradScaler, got "
                             f"{type(scaler).__name__}")
    return scaler


def check_method(method: Any, method_name: str, precision: Precision) -> None:
    """Refuse a method that cannot train under ``precision`` with the reason."""
    if precision.scaled and not getattr(method, "supports_loss_scale", False):
        raise PrecisionError(
            f"method {method_name!r} cannot train under precision='fp16': it does not declare "
            f"how its gradient follows the loss scale of the GradScaler (a non-linear use of "
            f"the losses, e.g. their logarithm, would make the scaled gradient wrong). Set "
            f"supports_loss_scale = True once its backward multiplies what it back-propagates "
            f"by self.grad_scale, or train it in precision='bf16'")


def scaled(value: torch.Tensor, scale: float) -> torch.Tensor:
    """``value * scale``, or ``value`` itself when ``scale`` is 1 (full precision: untouched)."""
    return value if scale == 1.0 else value * scale
