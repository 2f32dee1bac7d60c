"""Preserving the user's model while tracing, and recording which modules' ``training`` flags
traced code reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["mode", "preserved"]


_CONTAINERS = (dict, list, set)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore modes, buffers (values and registrations) and plain attributes (e.g. caches
    tracing filled) on exit."""
    modules = list(model.modules())
    modes = [m.__dict__.get("training", True) for m in modules]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    attrs: list[tuple[dict[str, Any], dict[str, Any], list[tuple[str, Any, Any]]]] = []
    for m in modules:
        d = m.__dict__
        plain = {k: v for k, v in d.items() if k[0] != "_"}
        shallow = [(k, v, type(v)(v)) for k, v in plain.items() if type(v) in _CONTAINERS]
        if "_buffers" in d:  # a forward that assigns a buffer replaces the registered tensor
            shallow.append(("_buffers", d["_buffers"], dict(d["_buffers"])))
        attrs.append((d, plain, shallow))
    try:
        yield
    finally:
        for m, md in zip(modules, modes):
            object.__setattr__(m, "training", md)
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for d, plain, shallow in attrs:
            for k in [k for k in d if k[0] != "_" and k not in plain]:
                del d[k]
            d.update(plain)
            for _k, container, saved in shallow:
                container.clear()
                if isinstance(container, list):
                    container.extend(saved)
                else:
                    container.update(saved)


@contextlib.contextmanager
def mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model.train(training)`` inside; every module's flag restored on exit.

    When a class overrides ``train``/``eval`` (it may derive other state from the mode),
    ``model.train(previous root mode)`` runs first on exit so the override can restore that state.
    """
    modules = list(model.modules())
    modes = [m.__dict__.get("training", True) for m in modules]
    model.train(training)
    try:
        yield
    finally:
        if any(type(m).train is not nn.Module.train or type(m).eval is not nn.Module.eval
               for m in modules):
            model.train(modes[0])
        for m, md in zip(modules, modes):
            object.__setattr__(m, "training", md)


# --------------------------------------------------------------------------------------------
# Which modules' ``training`` flags traced code reads
# --------------------------------------------------------------------------------------------
class _TrainingProbe:
    """A data descriptor installed on ``nn.Module`` while tracing: reads of ``m.training`` are
    recorded (a data descriptor on the class takes precedence over the instance ``__dict__``, where
    ``nn.Module`` keeps the flag). ``recording`` is off while real modules compute concrete values
    (an opaque leaf reads its own mode when the graph runs, not while tracing).
    """

    def __init__(self) -> None:
        self.reads: list[nn.Module] = []
        self.recording = False

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        try:
            value = obj.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None
        if self.recording:
            self.reads.append(obj)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__["training"] = value


@contextlib.contextmanager
def _probing_training(probe: _TrainingProbe) -> Iterator[None]:
    """Install ``probe`` as ``nn.Module.training`` (restoring what was there before)."""
    had = "training" in nn.Module.__dict__
    before = nn.Module.__dict__.get("training")
    nn.Module.training = probe  # type: ignore[assignment]
    try:
        yield
    finally:
        if had:
            nn.Module.training = before  # type: ignore[assignment]
        else:
            del nn.Module.training


@contextlib.contextmanager
def _recording(probe: _TrainingProbe | None, on: bool) -> Iterator[None]:
    if probe is None:
        yield
        return
    was = probe.recording
    probe.recording = on
    try:
        yield
    finally:
        probe.recording = was


def _class_attrs(t: type) -> set[str]:
    """Attributes defined by a module class below ``nn.Module`` in its MRO."""
    return {k for c in t.__mro__ if c is not nn.Module and c is not object for k in vars(c)}


_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _freeze(v: Any, depth: int = 3) -> Any:
    """A comparable snapshot of a plain attribute: scalars by value, containers and plain objects
    by content (``depth`` levels deep), modules and tensors by identity (and shape)."""
    if isinstance(v, _SCALARS):
        return (type(v), v)
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), tuple(v.shape))
    if isinstance(v, nn.Module) or depth == 0:
        return ("id", id(v))
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        return (type(v), tuple(_freeze(x, depth - 1) for x in items))
    if isinstance(v, dict):
        return (type(v), tuple((_freeze(k, 1), _freeze(x, depth - 1)) for k, x in v.items()))
    attrs = getattr(v, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(v, type):
        return (type(v), id(v), _freeze(attrs, depth - 1))
    return ("id", id(v))


def _module_state(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Every module's attributes but ``training``, frozen for comparison."""
    return [(m, _freeze({k: v for k, v in m.__dict__.items() if k != "training"}))
            for m in model.modules()]


def _mode_switch_changes(model: nn.Module) -> list[str]:
    """Modules whose state other than ``training`` changes when ``model`` switches eval -> train.

    Some classes override ``train`` (segmentation-models-pytorch keeps a frozen encoder in eval
    mode); as long as only ``training`` flags change, a graph that reads no flag is the same.
    """
    with preserved(model), mode(model, False):
        before = _module_state(model)
        model.train(True)
        after = {id(m): st for m, st in _module_state(model)}
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    return [names.get(id(m), type(m).__name__) for m, st in before if after.get(id(m)) != st]


@contextlib.contextmanager
def _unchanged(model: nn.Module) -> Iterator[None]:
    yield
