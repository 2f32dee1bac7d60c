"""Image files the static renderers write: the supported suffixes and a matplotlib figure.

matplotlib is imported lazily with the Agg backend; figures are made without pyplot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routesurgeon.errors import InputError

_FORMATS = (".png", ".svg", ".pdf")


def _figure(width_in: float, height_in: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in))


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in _FORMATS:
        raise InputError(f"unsupported image format {path.suffix!r}; use one of {_FORMATS}")
