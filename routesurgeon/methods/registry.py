"""Registry of training methods, looked up by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

_METHODS: dict[str, Callable[..., Any]] = {}

T = TypeVar("T")


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make a method available under ``name`` (lower case, dashes)."""

    def deco(cls: T) -> T:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name]!r}")
        _METHODS[name] = cls  # type: ignore[assignment]
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return sorted(_METHODS)


def get_method_class(name: str) -> Callable[..., Any]:
    """The class registered under ``name``; the error lists the available names."""
    _load_builtin_methods()
    key = name.lower().replace("_", "-")
    if key not in _METHODS:
        raise ValueError(
            f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[key]


def _load_builtin_methods() -> None:
    # Imported for their registration side effect; late to avoid import cycles.
    from routesurgeon.methods import (  # noqa: F401
        aggregators,
        baselines,
        drmgf,
        drmgf_step,
        scalarizers,
    )
