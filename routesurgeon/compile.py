"""``torch.compile`` for the ``Trainer``: ``Trainer(..., compile=True | mode | options)``.

What is compiled is the traced graph each method runs forward (the Surgeon's graph for the
loss-weighting and aggregation baselines, ``imta-ge``'s equilibrium graph, ``drmgf-step``'s
capture graph); the backward through it is AOTAutograd's compiled backward. Checkpoints,
exports and the model's ``state_dict`` are unchanged: the user's model is never wrapped.

``drmgf-step`` (``mode="exact"`` or ``"depth"``) asks for the gradient of each task at the
outputs of the shared layers. The output of a layer inside a compiled graph is not a node of
the autograd graph (autograd sees one node for the whole compiled graph), so: in ``exact`` mode
(plain conv/linear shared layers) the graph is compiled whole with those layers' weights
detached and a zero *probe* input added to each one's output (``ProbedGraph``): the gradient at
a probe is the gradient at the output, and the compiled backward computes no weight gradient of
those layers, which are then computed once from the fused output gradient, as in eager. In
``depth`` mode (or with other shared layers) those layers and the cut run eagerly
(``torch.compiler.disable``) and the graph is compiled in segments between them. Either way the
results equal eager within float32 rounding (``tests/test_compile.py``; cost in
``benchmarks/compile_bench.py``). On a CPU inductor's ``layout_optimization`` (channels-last
convolutions) is turned off unless ``options`` set it: measured slower there.

Methods a compile mode cannot serve are refused with a ``CompileError`` naming the reason:
``drmgf`` (per-task gated forwards through ``torch.func.functional_call`` and a fusion pass that
rewrites the weights in place every batch: it would recompile per task and per batch),
``drmgf-step`` in ``mode="branch"`` (its branch scales are tensors re-assigned on modules every
step), and the CUDA-graph modes (``"reduce-overhead"``, ``"max-autotune"``) for methods that
back-propagate several times through one forward (``drmgf-step``, the torchjd aggregators: a
CUDA graph replays into static buffers that the next step overwrites while their retained
graphs still read them; use ``"max-autotune-no-cudagraphs"``).

Exported routes (``surgeon.export_routes``) are plain ``GraphModule``s: they compile with
``torch.compile(route, fullgraph=True)`` and ``torch.export.export(route, (x,))`` as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from routesurgeon.errors import CompileError

__all__ = ["CUDA_GRAPH_MODES", "MODES", "CompileConfig", "eager_call", "resolve_compile"]

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class CompileConfig:
    """Arguments of ``torch.compile`` (see its documentation)."""

    mode: str = "default"
    backend: str = "inductor"
    dynamic: bool | None = None
    fullgraph: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    #: the model's device type (set by the Trainer). On "cpu", inductor's
    #: ``layout_optimization`` (channels-last convolutions) is off unless ``options`` set it:
    #: measured slower on a CPU (``benchmarks/compile_bench.py``).
    device_type: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CompileError(f"unknown torch.compile mode {self.mode!r}; modes: {MODES}")
        if self.options and self.mode != "default":
            raise CompileError("torch.compile takes mode= or options=, not both")

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled with these arguments."""
        kw: dict[str, Any] = {"backend": self.backend, "dynamic": self.dynamic,
                              "fullgraph": self.fullgraph}
        options = dict(self.options)
        if (self.backend == "inductor" and self.device_type == "cpu"
                and "layout_optimization" not in options):
            from torch._inductor import list_mode_options

            options = {**list_mode_options(self.mode), **options, "layout_optimization": False}
        if options:
            kw["options"] = options
        elif self.mode != "default":
            kw["mode"] = self.mode
        return torch.compile(fn, **kw)


def resolve_compile(value: bool | str | Mapping[str, Any] | CompileConfig | None,
                    device_type: str | None = None) -> CompileConfig | None:
    """``False``/``None``: no compile; ``True``: the defaults; a mode name; a dict of
    ``CompileConfig`` fields; or a ``CompileConfig``; for a model on ``device_type``."""
    if value is None or value is False:
        return None
    if value is True:
        cfg = CompileConfig()
    elif isinstance(value, CompileConfig):
        cfg = value
    elif isinstance(value, str):
        cfg = CompileConfig(mode=value)
    elif isinstance(value, Mapping):
        unknown = set(value) - {"mode", "backend", "dynamic", "fullgraph", "options"}
        if unknown:
            raise CompileError(f"unknown compile options {sorted(unknown)}; use mode, backend, "
                               f"dynamic, fullgraph, options")
        cfg = CompileConfig(**value)
    else:
        raise CompileError(f"compile must be a bool, a mode name, a dict or a CompileConfig, "
                           f"got {type(value).__name__}")
    if cfg.device_type is None and device_type is not None:
        cfg = dataclasses.replace(cfg, device_type=device_type)
    return cfg


def check_method(method: Any, method_name: str, cfg: CompileConfig) -> None:
    """Refuse a method that cannot train under ``cfg`` with its reason."""
    why = getattr(method, "compile_unsupported", None)
    reason = why(cfg) if why is not None else (
        "it runs its own forward and does not declare how it is compiled "
        "(define compile_unsupported(cfg) returning None and compile its graph with "
        "self.compiler)" if hasattr(method, "forward") else None)
    if reason:
        raise CompileError(f"method {method_name!r} cannot train under torch.compile "
                           f"(mode={cfg.mode!r}): {reason}")


def cuda_graph_reason(cfg: CompileConfig) -> str | None:
    """Why a method that back-propagates several times through one forward refuses ``cfg``."""
    if cfg.mode in CUDA_GRAPH_MODES or cfg.options.get("triton.cudagraphs"):
        return ("CUDA-graph modes replay into static output buffers that the next step "
                "overwrites, while this method back-propagates several times through one "
                "forward (retained graphs); use mode='max-autotune-no-cudagraphs' or 'default'")
    return None


@torch.compiler.disable
def eager_call(module: nn.Module, *args: Any) -> Any:
    """``module(*args)`` outside the compiled graph (a graph break around it)."""
    return module(*args)


def eager_nodes(gm: Any, modules: set[str],
                functions: Mapping[Callable[..., Any], Callable[..., Any]]) -> Any:
    """A copy of the ``GraphModule`` ``gm`` in which the calls of the modules at the paths
    ``modules`` go through ``eager_call`` and the calls of each function in ``functions``
    through its replacement (a ``torch.compiler.disable``-d one): compiled, the graph breaks
    around them, so their outputs are tensors of the autograd graph that later nodes use."""
    import copy

    import torch.fx as fx

    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    graph = out.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) in modules:
            with graph.inserting_before(node):
                mod = graph.get_attr(node.target)
                new = graph.call_function(eager_call, (mod, *node.args), dict(node.kwargs))
        elif node.op == "call_function" and node.target in functions:
            with graph.inserting_before(node):
                new = graph.call_function(functions[node.target], node.args, dict(node.kwargs))
        else:
            continue
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    out.recompile()
    return out


def compiled_forward(surgeon: Any, cache: dict[int, Any], cfg: CompileConfig, args: Any,
                     kwargs: Any) -> Any:
    """What ``surgeon(*args, **kwargs)`` returns (the plain forward), through the compiled
    graph of the current mode (compiled once per graph, kept in ``cache``)."""
    from routesurgeon.guards import check_call_inputs

    check_call_inputs(surgeon.model, surgeon._example_meta, args, kwargs)
    if surgeon.traced.specialized:
        surgeon._check_shapes(args, kwargs)
    gm = surgeon.graph_module
    fn = cache.get(id(gm))
    if fn is None:
        fn = cache[id(gm)] = cfg(gm)
    return fn(*args, **kwargs)


def _detached_layer(module: nn.Module, x: Any) -> Any:
    """``module(x)`` with its weight and bias detached: no gradient reaches them in the graph
    (their gradients are computed from the fused output gradient, ``ProbedGraph``)."""
    weight = cast(torch.Tensor, module.weight)
    bias = cast("torch.Tensor | None", module.bias)
    w = weight.detach()
    b = bias.detach() if bias is not None else None
    if isinstance(module, nn.Linear):
        return torch.nn.functional.linear(x, w, b)
    conv = module  # a plain Conv1d/2d/3d (checked by ProbedGraph.eligible)
    return conv._conv_forward(x, w, b)  # type: ignore[operator]


class ProbedGraph:
    """A ``drmgf-step`` capture graph compiled whole (``mode="exact"``), without graph breaks.

    Each captured shared layer is called with its weight and bias detached, and a zero *probe*
    tensor (an input of the compiled graph) is added to its output: the gradient of a loss at a
    probe is the gradient at the layer's output, through the compiled backward, which computes
    no weight gradient of those layers. Their weight gradients are then computed from the fused
    output gradient and the layer's input (``weight_grads``), as eager ``autograd.grad`` of the
    output would. The probes' shapes come from one eager run of the capture graph per input
    shape (and autocast state).
    """

    def __init__(self, gm: Any, names: list[str], cfg: Callable[[Any], Any]) -> None:
        import copy

        import torch.fx as fx

        self.source = gm
        self.names = names
        out = fx.GraphModule(gm, copy.deepcopy(gm.graph), "ProbedCapture")
        graph = out.graph
        places = [n for n in graph.nodes if n.op == "placeholder"]
        output = next(n for n in graph.nodes if n.op == "output")
        _, captured, _ = output.args[0]
        probes: list[fx.Node] = []
        with graph.inserting_after(places[-1]):
            for k in reversed(range(len(captured))):
                probes.insert(0, graph.placeholder(f"_rs_probe_{k}"))
        values, inputs = [], []
        for k, node in enumerate(captured):
            with graph.inserting_before(node):
                mod = graph.get_attr(node.target)
                y = graph.call_function(_detached_layer, (mod, node.args[0]))
                tapped = graph.call_function(torch.add, (y, probes[k]))
            node.replace_all_uses_with(tapped)
            graph.erase_node(node)
            values.append(y)
            inputs.append(y.args[1])
        original, _, cut = output.args[0]  # re-read: uses of the layers now read the taps
        output.args = ((original, tuple(values), cut, tuple(inputs)),)
        out.recompile()
        self.modules = [gm.get_submodule(n) for n in names]
        self.run = cfg(out)
        self._shapes: dict[Any, list[tuple[tuple[int, ...], torch.dtype]]] = {}
        self.probes: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    @staticmethod
    def eligible(gm: Any, names: list[str]) -> bool:
        """Plain conv/linear layers only (as ``_ActivationGated``), inputs without defaults."""
        from routesurgeon.importance import _activation_gateable

        places = [n for n in gm.graph.nodes if n.op == "placeholder"]
        return bool(names) and all(not n.args for n in places) and all(
            _activation_gateable(gm.get_submodule(n)) for n in names)

    def __call__(self, *args: Any) -> tuple[Any, list[torch.Tensor], Any]:
        key = (tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args),
               torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))
        shapes = self._shapes.get(key)
        if shapes is None:  # one eager run: the shape and dtype of every probe
            with torch.no_grad():
                _, ys, _ = self.source(*args)
            shapes = self._shapes[key] = [(tuple(y.shape), y.dtype) for y in ys]
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        self.probes = [torch.zeros(s, dtype=d, device=dev, requires_grad=True) for s, d in shapes]
        out, values, cut, inputs = self.run(*args, *self.probes)
        self.inputs = list(inputs)
        return out, list(values), cut

    def weight_grads(self, k: int, grad: torch.Tensor) -> list[torch.Tensor | None]:
        """The gradients of layer ``k``'s weight and bias for the output gradient ``grad``."""
        m = self.modules[k]
        w = cast(torch.Tensor, m.weight)
        b = cast("torch.Tensor | None", m.bias)
        x = self.inputs[k].detach()
        dt = grad.dtype
        if isinstance(m, nn.Linear):
            g2 = grad.reshape(-1, w.shape[0])
            gw = g2.t().mm(x.reshape(-1, w.shape[1]).to(dt))
            gb = g2.sum(0, dtype=w.dtype) if b is not None else None
        else:
            c = m
            assert isinstance(c, nn.modules.conv._ConvNd)
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x.to(dt), w.to(dt), [w.shape[0]] if b is not None else None,
                list(c.stride), list(c.padding), list(c.dilation), False,
                [0] * len(c.stride), c.groups, [False, True, b is not None])
        return [gw.to(w.dtype), gb.to(w.dtype) if gb is not None else None][: 2 if b is not None
                                                                              else 1]
