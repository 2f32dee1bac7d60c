"""What every command shares: exit codes, number formatting and console helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _si(n: float, unit: str = "") -> str:
    """``25557032`` -> ``25.56M``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _console(file: Any) -> Console:
    # Not a terminal (pipes, CI, pytest capture): a fixed width so tables are not squeezed.
    tty = bool(getattr(file, "isatty", lambda: False)())
    return Console(file=file, width=None if tty else 120, highlight=False, soft_wrap=False)


def _line(console: Console, text: str) -> None:
    """A plain line (no markup, no wrapping: paths and messages stay whole)."""
    console.file.write(text + "\n")


@contextmanager
def _status(err: Console, message: str) -> Iterator[None]:
    """A spinner on stderr while something long runs (silent when stderr is not a terminal)."""
    with err.status(message, spinner="dots"):
        yield
