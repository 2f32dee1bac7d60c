"""Patches on ``torch.fx.Proxy`` so ``len``/``int``/``float``/``range``/unpacking specialise under
concrete tracing (installed once, at import)."""

from __future__ import annotations

import bisect
import dis
import functools
import inspect
import operator
import sys
from collections.abc import Callable, Iterator
from types import CodeType
from typing import Any, cast

import torch.fx as fx

from routesurgeon.tracing.tracer import RouteTracer


@functools.lru_cache(maxsize=512)
def _instructions(code: CodeType) -> tuple[list[int], list[str], list[Any]]:
    """Offsets, op names and arguments of ``code``'s instructions (for other tracers than ours)."""
    inst = list(dis.get_instructions(code))
    return [i.offset for i in inst], [i.opname for i in inst], [i.argval for i in inst]


def _install_concrete_dunders() -> None:
    """Let ``len``/``int``/``float``/``range`` on a proxy specialise under concrete tracing."""

    def make(what: str, conv: Callable[[Any], Any]) -> Callable[[fx.Proxy], Any]:
        def method(self: fx.Proxy) -> Any:
            tracer = self.tracer
            if isinstance(tracer, RouteTracer):
                return conv(tracer._specialize(what, self))
            if what == "len":
                raise RuntimeError("'len' is not supported in symbolic tracing by default.")
            raise TypeError(f"{what}() of a traced value is not supported by torch.fx")

        return method

    if not getattr(fx.Proxy, "_rs___getattr__", False):
        plain_getattr = fx.Proxy.__getattr__

        def getattr_(self: fx.Proxy, k: str) -> Any:
            tracer = self.tracer
            if k == "device" and isinstance(tracer, RouteTracer) and tracer.hooked and (
                tracer.concrete is not None
            ):  # hook state keyed by device (see RouteTracer.call_module)
                return tracer.device_of(self)
            return plain_getattr(self, k)

        fx.Proxy.__getattr__ = getattr_  # type: ignore[method-assign]
        fx.Proxy._rs___getattr__ = True  # type: ignore[attr-defined]

    if not getattr(fx.Proxy, "_rs___iter__", False):

        def iter_(self: fx.Proxy) -> Iterator[Any]:
            # fx's Proxy.__iter__ reads *its caller's* frame to tell ``a, b = proxy`` from a
            # loop, so it cannot be wrapped (it would read this frame): its logic, with the
            # caller's disassembly cached per code object (fx disassembles the whole calling
            # function on every unpacking); every tracer, not only ours, goes through here
            tracer = self.tracer
            frame = inspect.currentframe()
            caller = frame.f_back if frame is not None else None
            if caller is None:
                return tracer.iter(self)
            if isinstance(tracer, RouteTracer):
                offsets, names, counts = tracer.instructions(caller.f_code)
            else:
                offsets, names, counts = _instructions(caller.f_code)
            if sys.version_info >= (3, 11):
                i = bisect.bisect_left(offsets, caller.f_lasti)
            else:  # before 3.11, f_lasti counts code units
                i = caller.f_lasti // 2
            if i < len(names) and names[i] == "UNPACK_SEQUENCE":
                return (self[k] for k in range(counts[i]))  # type: ignore[index]
            return tracer.iter(self)

        fx.Proxy.__iter__ = iter_  # type: ignore[method-assign]
        fx.Proxy._rs___iter__ = True  # type: ignore[attr-defined]

    for dunder, what, conv in [
        ("__len__", "len", len),
        ("__int__", "int", int),
        ("__index__", "index", operator.index),
        ("__float__", "float", float),
    ]:
        if not getattr(fx.Proxy, "_rs_" + dunder, False):
            setattr(fx.Proxy, dunder, make(what, cast("Callable[[Any], Any]", conv)))
            setattr(fx.Proxy, "_rs_" + dunder, True)


_install_concrete_dunders()
