"""``RouteTracer``: ``torch.fx`` tracer with library leaves, user leaves, module hooks and optional
concrete values (``fx-concrete``)."""

from __future__ import annotations

import contextlib
import dis
import operator
import traceback
from collections.abc import Callable, Collection, Iterator, Sequence
from types import CodeType
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from routesurgeon.tracing.modes import _recording, _TrainingProbe

__all__ = ["RouteTracer"]


# Ops that read tensor *data* into Python: never specialised on.
_DATA_READS = {"item", "tolist", "numpy", "__bool__", "any", "all", "nonzero"}


def _value(x: Any) -> Any:
    """The example value behind a proxy (concrete tracing only)."""
    if isinstance(x, fx.proxy.Attribute):
        return getattr(_value(x.root), x.attr)
    if isinstance(x, fx.Proxy):
        return x.node.meta["rs_value"]
    return x


def _values(tree: Any) -> Any:
    return pytree.tree_map(_value, tree, is_leaf=lambda v: isinstance(v, fx.Proxy))


class RouteTracer(fx.Tracer):
    """``torch.fx`` tracer with library leaves, user leaves and optional concrete values."""

    def __init__(
        self,
        leaf_types: Sequence[type] = (),
        leaf_paths: Sequence[str] = (),
        autowrap: Collection[Callable[..., Any]] = (),
        concrete: dict[str, Any] | None = None,
        open_paths: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(autowrap_functions=tuple(autowrap), param_shapes_constant=True)
        self.leaf_types = tuple(leaf_types)
        self.leaf_paths = set(leaf_paths)
        self.open_paths = open_paths  # library leaves traced into (they hold conv/linear layers)
        self.concrete = concrete  # placeholder name -> example value, or None for plain fx
        self.specializations: list[str] = []
        self.batch_specialized = False
        self.hooked = False  # some module has forward (pre-)hooks: run them on proxies
        self.probe: _TrainingProbe | None = None  # records reads of modules' training flags
        # a specialised value came from an opaque custom leaf's output (whose shape may depend
        # on the mode): the graph is only valid for the mode it was traced in
        self.leaf_specialized = False
        self._code_cache: dict[CodeType, tuple[list[int], list[str], list[Any]]] = {}
        # > 0 while an op's concrete value is computed: module calls and attribute reads then
        # run as they would untraced (cheaper than undoing fx's patches of nn.Module, which
        # makes CPython invalidate the type caches of every Module subclass, twice per op)
        self._computing = 0

    # -- leaves ------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if module_qualified_name in self.open_paths:
            return False
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:  # type: ignore[override]
        self._names: dict[int, str] = {}
        if isinstance(root, nn.Module):
            self.hooked = any(m._forward_hooks or m._forward_pre_hooks for m in root.modules())
            for n, t in [*root.named_parameters(), *root.named_buffers()]:
                self._names.setdefault(id(t), n)
        try:
            with _recording(self.probe, True):
                return super().trace(root, concrete_args)
        except Exception as e:
            if not hasattr(e, "_rs_module"):  # remember where it failed, for the error message
                e._rs_module = self.current_module()  # type: ignore[attr-defined]
                e._rs_where = _user_frame(traceback.extract_tb(e.__traceback__))  # type: ignore[attr-defined]
            raise

    def current_module(self) -> str:
        """Qualified name of the innermost module being traced (``''`` for the root)."""
        stack = list(self.module_stack.values())
        return stack[-1][0] if stack else ""

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's parameter/buffer lookup with a name table (fx scans all parameters per access)."""
        if self._computing:
            return attr_val
        name = self._names.get(id(attr_val)) if isinstance(attr_val, torch.Tensor) else None
        if name is None or not (
            isinstance(attr_val, nn.Parameter) or self.proxy_buffer_attributes
        ):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            factory = None
            if self.param_shapes_constant:
                def factory(node: fx.Node, n: str = name, v: Any = attr_val) -> fx.Proxy:
                    return fx.proxy.ParameterProxy(self, node, n, v)
            parameter_proxy_cache[name] = self.create_proxy(
                "get_attr", name, (), {}, proxy_factory_fn=factory
            )
        return parameter_proxy_cache[name]

    # -- module hooks ------------------------------------------------------------------------
    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        """Run the module's forward (pre-)hooks on proxies, as ``nn.Module.__call__`` would.

        Hooks often keep Python state keyed by ``x.device`` (timm's ``FeatureHookNet``), so they
        are only traced with concrete values, where ``.device`` is the example's device.
        """
        if self._computing:
            return forward(*args, **kwargs)  # nn.Module.__call__ untraced, hooks included
        if not (m._forward_pre_hooks or m._forward_hooks):
            return super().call_module(m, forward, args, kwargs)
        if self.concrete is None:
            raise fx.proxy.TraceError(
                f"module {self.path_of_module(m)!r} ({type(m).__name__}) has forward hooks; they "
                f"are traced with concrete values"
            )
        for hid, hook in list(m._forward_pre_hooks.items()):
            if hid in m._forward_pre_hooks_with_kwargs:
                res = hook(m, args, kwargs)
                if res is not None:
                    args, kwargs = res
            else:
                res = hook(m, args)
                if res is not None:
                    args = res if isinstance(res, tuple) else (res,)
        out = super().call_module(m, forward, args, kwargs)
        for hid, hook in list(m._forward_hooks.items()):
            if hid in m._forward_hooks_with_kwargs:
                res = hook(m, args, kwargs, out)
            else:
                res = hook(m, args, out)
            if res is not None:
                out = res
        return out

    # -- concrete values ---------------------------------------------------------------------
    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):  # type: ignore[no-untyped-def]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if self.concrete is not None and kind != "output":
            proxy.node.meta["rs_value"] = self._compute(kind, target, args, kwargs)
            inputs = proxy.node.all_input_nodes
            if target in _DATA_READS or any(a.meta.get("rs_data") for a in inputs):
                proxy.node.meta["rs_data"] = True
            if (kind == "call_module" and not _torch_nn_type(self.root.get_submodule(target))) or (
                any(a.meta.get("rs_leaf") for a in inputs)
            ):
                proxy.node.meta["rs_leaf"] = True
        return proxy

    def _compute(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            assert self.concrete is not None
            name = str(target).lstrip("*")
            if name in self.concrete:
                return self.concrete[name]
            return args[0] if args else None
        if kind == "get_attr":
            obj: Any = self.root
            with self._concrete():  # fx's patched getattr would return a proxy: recursion
                for part in str(target).split("."):
                    obj = getattr(obj, part)
            return obj
        a, kw = _values(args), _values(kwargs)
        with torch.no_grad(), self._concrete(), _recording(self.probe, False):
            if kind == "call_function":
                return target(*a, **kw)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **kw)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **kw)
        raise AssertionError(kind)

    @contextlib.contextmanager
    def _concrete(self) -> Iterator[None]:
        """Run real modules while fx has ``nn.Module.__call__`` patched for tracing."""
        self._computing += 1
        try:
            yield
        finally:
            self._computing -= 1

    def _specialize(self, what: str, obj: fx.Proxy) -> Any:
        node = obj.node if not isinstance(obj, fx.proxy.Attribute) else obj.root.node
        if self.concrete is None:
            raise fx.proxy.TraceError(
                f"{what}() of the result of {_op_text(node)} in module "
                f"{self.current_module() or '<root>'!r}"
            )
        value = _value(obj)
        reads_data = isinstance(value, torch.Tensor) and what in ("bool", "int", "float", "index")
        if node.meta.get("rs_data") or reads_data:
            raise fx.proxy.TraceError(
                f"{what}() of the result of {_op_text(node)}, a value computed from tensor data, "
                f"in module {self.current_module() or '<root>'!r}: data-dependent control flow "
                f"cannot be specialised safely"
            )
        if _reads_batch_dim(node, what, value):
            self.batch_specialized = True
        if node.meta.get("rs_leaf"):
            self.leaf_specialized = True
        self.specializations.append(f"{self.current_module() or '<root>'}: {what} = {value!r}")
        return value

    def device_of(self, obj: fx.Proxy) -> torch.device:
        """The example value's device (never data- or batch-dependent), recorded."""
        device = _value(obj).device
        self.specializations.append(f"{self.current_module() or '<root>'}: device = {device}")
        return device

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self._specialize("bool", obj))

    def instructions(self, code: CodeType) -> tuple[list[int], list[str], list[Any]]:
        """Offsets, op names and arguments of ``code``'s instructions (cached per trace)."""
        hit = self._code_cache.get(code)
        if hit is None:
            inst = list(dis.get_instructions(code))
            hit = ([i.offset for i in inst], [i.opname for i in inst], [i.argval for i in inst])
            self._code_cache[code] = hit
        return hit

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self._specialize("iter", obj)
        return iter([obj[i] for i in range(len(value))])  # type: ignore[index]


def _torch_nn_type(m: nn.Module) -> bool:
    """A module class of ``torch.nn`` itself (its output shapes never depend on the mode)."""
    return type(m).__module__.startswith("torch.nn.")


def _op_text(node: fx.Node) -> str:
    """``op 'gt' (fx node 'gt_1', from 'sum')``: the op a Python conversion was applied to."""
    if node.op == "call_method":
        name = f"Tensor.{node.target}"
    elif node.op == "call_module":
        name = f"module {node.target!r}"
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
    else:
        name = f"{node.op} {node.target}"
    inputs = [n.name for n in node.all_input_nodes]
    src = f", from {', '.join(repr(i) for i in inputs[:3])}" if inputs else ""
    return f"op {name!r} (fx node {node.name!r}{src})"


_INTERNAL = ("/torch/", "/routesurgeon/tracing/", "/contextlib.py")


def _user_frame(frames: traceback.StackSummary) -> str:
    """``file:line `code``` of the innermost frame outside torch and this module."""
    for fr in reversed(frames):
        if not any(part in fr.filename for part in _INTERNAL):
            return f"{fr.filename}:{fr.lineno} `{(fr.line or '').strip()}`"
    return ""


def _reads_batch_dim(node: fx.Node, what: str, value: Any) -> bool:
    """Whether a specialised value may depend on the batch size (then full shapes are guarded)."""
    if what in ("len", "iter") and isinstance(value, torch.Tensor):
        return True
    seen: set[fx.Node]
    seen, todo = set(), [node]
    while todo and len(seen) < 64:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_method" and n.target == "size":
            idx = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if idx is None or idx == 0:
                return True
        if n.op == "call_function" and n.target is operator.getitem:
            src = n.args[0]
            if isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr \
                    and src.args[1] == "shape":
                idx = n.args[1]
                if not isinstance(idx, int) or idx == 0:
                    return True
        if n.op == "call_function" and n.target is getattr and n.args[1] == "shape" and (
            all(u.target is not operator.getitem for u in n.users)
        ):
            return True
        todo.extend(n.all_input_nodes)
    return False
