"""Tracing front-end: turn a user's model into a ``torch.fx.GraphModule`` over the same modules.

Three paths, tried in order until one succeeds (the path taken is recorded):

``fx``
    ``torch.fx`` symbolic tracing, with timm's leaf modules and autowrapped functions, the user's
    ``leaf_modules`` and known fixes for segmentation-models-pytorch. The graph is generic in the
    input shape.
``fx-concrete``
    The same tracer, but every proxy also carries the value it takes on the example inputs, so
    Python control flow on shapes (``if h % 32``, "same" padding, ``len(x)``) evaluates instead of
    failing. The graph is specialised to the example input shape: the ``Surgeon`` checks later
    inputs against it. Every specialisation is recorded.
``fx-concrete+leaf``
    When a submodule still cannot be traced, it is made a leaf (an opaque call) and tracing is
    retried. Its parameters stay visible to the analysis as one opaque node; its channels are never
    pruned.

The graph is traced in eval mode while every read of a module's ``training`` flag by traced Python
code is recorded (see ``_TrainingProbe``). When no code read the flag, no module overrides
``nn.Module.train`` and no specialised value came from an opaque leaf's output, the code run in
train mode is the same, so the one graph serves both modes (leaf modules such as BatchNorm and
Dropout read their mode when the graph runs). Otherwise the model is traced again in train mode;
when ``self.training`` changes the graph, both are kept and the ``Surgeon`` runs the one matching
its mode. Tracing never changes the user's model:
modes, buffers and module attributes (caches that tracing writes proxies into) are restored.
"""

from __future__ import annotations

import bisect
import contextlib
import dis
import inspect
import operator
import sys
import traceback
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from types import CodeType
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from routesurgeon.errors import InputError, TracingError

__all__ = ["ExampleInputs", "TraceResult", "bind_inputs", "normalize_inputs", "trace"]

MAX_AUTO_LEAVES = 24

ExampleInputs = Any


@dataclass
class TraceResult:
    """What tracing produced and how."""

    train_graph: fx.GraphModule
    eval_graph: fx.GraphModule
    path: str
    leaves: list[str] = field(default_factory=list)
    batch_specialized: bool = False
    specializations: list[str] = field(default_factory=list)
    attempts: list[str] = field(default_factory=list)
    # why the model was traced in train mode too ("" when one eval-mode trace serves both modes)
    retrace_reason: str = ""

    @property
    def dual(self) -> bool:
        """True when the model's forward builds a different graph in train and eval mode."""
        return self.train_graph is not self.eval_graph

    @property
    def specialized(self) -> bool:
        return bool(self.specializations)


def normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_inputs`` as ``(args, kwargs)``: a tensor, a tuple/list of args or a kwargs dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(
        f"example_inputs must be a Tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Leaf modules and autowrapped functions known to other libraries
# --------------------------------------------------------------------------------------------
def _library_leaves() -> tuple[set[type], set[Callable[..., Any]]]:
    leaf_types: set[type] = set()
    functions: set[Callable[..., Any]] = set()
    try:
        from timm.layers import _fx as timm_fx

        leaf_types.update(timm_fx.get_notrace_modules())
        functions.update(timm_fx.get_notrace_functions())
    except ImportError:  # timm is optional
        pass
    try:  # smp's mix-transformer LayerNorm branches on x.ndim; it is per-channel
        from segmentation_models_pytorch.encoders import mix_transformer

        ln = getattr(mix_transformer, "LayerNorm", None)
        if isinstance(ln, type):
            leaf_types.add(ln)
    except ImportError:
        pass
    return leaf_types, functions


@contextlib.contextmanager
def _library_fixes(model: nn.Module) -> Iterator[None]:
    """Known, documented fixes that make library models traceable, undone on exit."""
    changed: list[tuple[nn.Module, str, Any]] = []
    for m in model.modules():
        # smp: SegmentationModel.check_input_shape raises from Python on the input size
        if hasattr(type(m), "check_input_shape") and hasattr(m, "requires_divisible_input_shape"):
            changed.append((m, "requires_divisible_input_shape", m.requires_divisible_input_shape))
            cast(Any, m).requires_divisible_input_shape = False
    try:
        yield
    finally:
        for m, name, old in changed:
            setattr(m, name, old)


# --------------------------------------------------------------------------------------------
# Preserving the user's model while tracing
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------------
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
            with _unpatched_modules():  # fx's patched getattr would return a proxy: recursion
                for part in str(target).split("."):
                    obj = getattr(obj, part)
            return obj
        a, kw = _values(args), _values(kwargs)
        with torch.no_grad(), _unpatched_modules(), _recording(self.probe, False):
            if kind == "call_function":
                return target(*a, **kw)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **kw)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **kw)
        raise AssertionError(kind)

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


_INTERNAL = ("/torch/", "/routesurgeon/tracing.py", "/contextlib.py")


def _user_frame(frames: traceback.StackSummary) -> str:
    """``file:line `code``` of the innermost frame outside torch and this module."""
    for fr in reversed(frames):
        if not any(part in fr.filename for part in _INTERNAL):
            return f"{fr.filename}:{fr.lineno} `{(fr.line or '').strip()}`"
    return ""


@contextlib.contextmanager
def _unpatched_modules() -> Iterator[None]:
    """Run real modules while fx has ``nn.Module.__call__`` patched for tracing."""
    from torch.fx import _symbolic_trace as st

    patched_call, patched_getattr = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__ = st._orig_module_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = st._orig_module_getattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = patched_call  # type: ignore[method-assign]
        nn.Module.__getattr__ = patched_getattr  # type: ignore[method-assign]


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
        plain_iter = fx.Proxy.__iter__

        def iter_(self: fx.Proxy) -> Iterator[Any]:
            tracer = self.tracer
            frame = inspect.currentframe()
            caller = frame.f_back if frame is not None else None
            if not isinstance(tracer, RouteTracer) or caller is None or sys.version_info < (3, 11):
                return plain_iter(self)  # before 3.11, f_lasti counts code units
            # fx's Proxy.__iter__, with the caller's disassembly cached per code object (fx
            # disassembles the whole calling function on every tuple unpacking)
            offsets, names, counts = tracer.instructions(caller.f_code)
            i = bisect.bisect_left(offsets, caller.f_lasti)
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


# --------------------------------------------------------------------------------------------
# Tracing with fallbacks
# --------------------------------------------------------------------------------------------
def bind_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(
            f"example inputs do not fit {type(model).__name__}.forward{sig}: {e}"
        ) from e
    return dict(bound.arguments)


def _concrete_args(bound: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Non-tensor inputs are baked into the graph as constants."""
    sig = inspect.signature(model.forward)
    out: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in bound and not isinstance(bound[name], torch.Tensor):
            out[name] = bound[name]
        elif name not in bound and p.default is not p.empty:
            out[name] = p.default
    return out


def _trace_once(
    model: nn.Module,
    bound: dict[str, Any],
    leaf_types: Sequence[type],
    leaf_paths: Sequence[str],
    autowrap: Collection[Callable[..., Any]],
    concrete: bool,
    open_paths: frozenset[str] = frozenset(),
) -> tuple[fx.Graph, RouteTracer]:
    tracer = RouteTracer(leaf_types, leaf_paths, autowrap, concrete=bound if concrete else None,
                         open_paths=open_paths)
    tracer.probe = _TrainingProbe()
    with _probing_training(tracer.probe):
        graph = tracer.trace(model, concrete_args=_concrete_args(bound, model) or None)
    for node in graph.nodes:  # values are only needed while tracing
        node.meta.pop("rs_value", None)
    return graph, tracer


@dataclass
class _ModeTrace:
    """One successful trace in one mode (the graph is not yet compiled into a GraphModule)."""

    graph: fx.Graph
    root: nn.Module
    path: str
    auto_leaves: list[str]
    specializations: list[str]
    batch_specialized: bool
    mode_reads: list[str]  # modules whose ``training`` flag the traced code read
    leaf_specialized: bool

    def module(self, name: str) -> fx.GraphModule:
        return fx.GraphModule(self.root, self.graph, name)


@dataclass
class _Failure:
    module: str
    error: BaseException
    path: str

    def describe(self) -> str:
        where = self.module or "<root>"
        line = getattr(self.error, "_rs_where", "")
        at = f" (at {line})" if line else ""
        return f"{self.path}: in module {where!r}: {type(self.error).__name__}: {self.error}{at}"


def _trace_mode(
    model: nn.Module,
    bound: dict[str, Any],
    leaf_types: Sequence[type],
    user_leaves: Sequence[str],
    autowrap: Collection[Callable[..., Any]],
    auto_leaf: bool,
    attempts: list[str],
    open_paths: frozenset[str] = frozenset(),
    known: tuple[str, list[str]] | None = None,
) -> _ModeTrace:
    """Trace in the model's current mode.

    ``known``: the path and auto leaves the other mode needed; tracing starts from there.
    """
    leaves: list[str] = list(user_leaves)
    auto: list[str] = []
    last: _Failure | None = None
    plans = [("fx", False), ("fx-concrete", True)]
    if known is not None and known[0].startswith("fx-concrete"):
        plans = plans[1:]
    if known is not None:
        auto = [m for m in known[1] if m not in leaves]
        leaves += auto
    for path, concrete in plans:
        while True:
            try:
                with preserved(model), _library_fixes(model):
                    graph, tracer = _trace_once(model, bound, leaf_types, leaves, autowrap,
                                                concrete, open_paths)
                assert tracer.probe is not None
                reads = _module_names(model, tracer.probe.reads)
                return _ModeTrace(graph, tracer.root, path + ("+leaf" if auto else ""), auto,
                                  tracer.specializations, tracer.batch_specialized, reads,
                                  tracer.leaf_specialized)
            except Exception as e:  # any failure of the user's forward under tracing
                module = _failing_module(e)
                last = _Failure(module, e, path + ("+leaf" if auto else ""))
                attempts.append(last.describe())
                if not (concrete and auto_leaf) or len(auto) >= MAX_AUTO_LEAVES:
                    break
                if not module or module in leaves:
                    break
                leaves.append(module)
                auto.append(module)
    assert last is not None
    raise _trace_error(model, last, attempts)


def _module_names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    if not modules:
        return []
    ids = {id(m) for m in modules}
    return [name or "<root>" for name, m in model.named_modules() if id(m) in ids]


def _failing_module(e: BaseException) -> str:
    return getattr(e, "_rs_module", "")


def _trace_error(model: nn.Module, failure: _Failure, attempts: list[str]) -> TracingError:
    where = failure.module or "<root>"
    mod_type = type(model.get_submodule(failure.module)).__name__ if failure.module else type(
        model
    ).__name__
    tried = "\n  - ".join(attempts[-6:])
    line = getattr(failure.error, "_rs_where", "")
    at = f"\nFailing op at {line}" if line else ""
    if failure.module:
        todo = (f"pass leaf_modules=[{where!r}] (or its class {mod_type}) to "
                f"routesurgeon.instrument to treat it as one opaque op, or make the failing op "
                f"in {mod_type}.forward traceable (move Python control flow on tensor values into "
                f"a function decorated with torch.fx.wrap).")
    else:
        todo = (f"the failing op is in {mod_type}.forward itself, which cannot be an opaque leaf: "
                f"move the data-dependent code into a submodule and pass its path in "
                f"leaf_modules=[...], or into a function decorated with torch.fx.wrap.")
    return TracingError(
        f"could not trace {type(model).__name__}: module {where!r} ({mod_type}) failed with "
        f"{type(failure.error).__name__}: {failure.error}{at}\n"
        f"Paths tried:\n  - {tried}\n"
        f"What to do: {todo}"
    )


def trace(
    model: nn.Module,
    example_inputs: ExampleInputs,
    leaf_modules: Sequence[str | type] = (),
    auto_leaf: bool = True,
) -> TraceResult:
    """Trace ``model`` into train- and eval-mode graphs over the same module objects.

    One eval-mode trace serves both modes when that is provably the same graph (see
    ``_retrace_reason``); ``TraceResult.retrace_reason`` says why a second trace was needed.
    """
    if not isinstance(model, nn.Module):
        raise TracingError(f"expected an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    bound = bind_inputs(model, args, kwargs)
    lib_types, autowrap = _library_leaves()
    user_types = [x for x in leaf_modules if isinstance(x, type)]
    user_paths = [x for x in leaf_modules if isinstance(x, str)]
    for p in user_paths:
        try:
            model.get_submodule(p)
        except AttributeError as e:
            raise TracingError(f"leaf_modules names {p!r}, which is not a submodule") from e
    leaf_types = [*lib_types, *user_types]
    # Library leaves (timm's notrace modules) that hold conv/linear layers would hide those layers
    # from the analysis: trace into them (with concrete values if needed); the ones that still
    # fail become leaves again through the auto-leaf fallback.
    layer_types = (nn.modules.conv._ConvNd, nn.Linear)
    lib_tuple, user_tuple = tuple(lib_types), tuple(user_types)
    opened = frozenset(
        name for name, m in model.named_modules()
        if name and lib_tuple and isinstance(m, lib_tuple)
        and not (user_tuple and isinstance(m, user_tuple))
        and any(isinstance(sub, layer_types)
                for sub in cast(nn.Module, m).modules() if sub is not m)
    )  # a leaf that *is* a conv (timm's Conv2dSame) is already visible as one layer
    attempts: list[str] = []
    # Eval mode first (it neither draws random numbers nor updates running statistics while
    # computing concrete values); train mode only when the eval trace may not hold for it.
    name = type(model).__name__
    types = {type(m) for m in model.modules()}
    # nn.Module.train only sets flags (``mode`` restores them); an override may change more
    own_train = any(t.train is not nn.Module.train or t.eval is not nn.Module.eval for t in types)
    keep = preserved if own_train else _unchanged
    with keep(model), mode(model, False):
        ev = _trace_mode(model, bound, leaf_types, user_paths, autowrap, auto_leaf, attempts,
                         opened)
    eval_gm = ev.module(name)
    reason = _retrace_reason(model, ev, types, own_train)
    tr = ev
    train_gm = eval_gm
    if reason:
        with keep(model), mode(model, True):
            tr = _trace_mode(model, bound, leaf_types, user_paths, autowrap, auto_leaf, attempts,
                             opened, known=(ev.path, ev.auto_leaves))
        # same code: one graph serves both modes (no GraphModule is compiled for it)
        if tr.graph.python_code("self").src != eval_gm.code:
            train_gm = tr.module(name)
    paths = tr.path if tr.path == ev.path else f"{tr.path}/{ev.path}"
    return TraceResult(
        train_graph=train_gm,
        eval_graph=eval_gm,
        path=paths,
        leaves=sorted(set(tr.auto_leaves) | set(ev.auto_leaves)),
        batch_specialized=tr.batch_specialized or ev.batch_specialized,
        specializations=tr.specializations
        + [sp for sp in ev.specializations if sp not in tr.specializations],
        attempts=attempts,
        retrace_reason=reason,
    )


@contextlib.contextmanager
def _unchanged(model: nn.Module) -> Iterator[None]:
    yield


def _retrace_reason(model: nn.Module, ev: _ModeTrace, types: set[type], own_train: bool) -> str:
    """Why the eval-mode graph may not be the train-mode graph ("" when it provably is).

    Tracing runs the model's Python code, and ``model.train()`` changes nothing but the modules'
    ``training`` flags. If no traced code read a flag, the same code runs in train mode and
    produces the same graph, *unless* a class changes other state in ``train``/``eval`` or owns its
    ``training`` attribute, or a value the trace specialised on came from an opaque leaf module
    (it ran in eval mode while tracing; its output's shape could differ in train mode).
    """
    if ev.mode_reads:
        more = f" and {len(ev.mode_reads) - 3} more" if len(ev.mode_reads) > 3 else ""
        return f"traced code reads `training` of {ev.mode_reads[:3]}{more}"
    own = sorted(t.__name__ for t in types if "training" in _class_attrs(t))
    if own:
        return f"{own[:3]} define `training` themselves (its reads cannot be recorded)"
    if own_train:
        changed = _mode_switch_changes(model)
        if changed:
            return f"train() changes more than `training` flags in {changed[:3]}"
    if ev.leaf_specialized:
        return "a specialised value came from an opaque leaf module's output"
    return ""
