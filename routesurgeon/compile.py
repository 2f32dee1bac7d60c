"""``torch.compile`` for the ``Trainer``: ``Trainer(..., compile=True | mode | options)``.

What is compiled is the traced graph each method runs forward (the Surgeon's graph for the
loss-weighting and aggregation baselines, ``imta-ge``'s equilibrium graph, ``drmgf-step``'s
capture graph); the backward through it is AOTAutograd's compiled backward. Checkpoints,
exports and the model's ``state_dict`` are unchanged: the user's model is never wrapped.

``drmgf-step`` (``mode="exact"`` or ``"depth"``) asks for the gradient of each task at the
outputs of the shared layers. The output of a layer inside a compiled graph is not a node of
the autograd graph that later layers use, so those layers (and the cut of ``depth`` mode) run
eagerly (``torch.compiler.disable``): the graph is compiled in segments between them, in which
the norms, activations and residual sums are fused. Its results equal eager within float32
rounding (``tests/test_compile.py``; cost in ``benchmarks/compile_bench.py``).

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CompileError(f"unknown torch.compile mode {self.mode!r}; modes: {MODES}")
        if self.options and self.mode != "default":
            raise CompileError("torch.compile takes mode= or options=, not both")

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled with these arguments."""
        kw: dict[str, Any] = {"backend": self.backend, "dynamic": self.dynamic,
                              "fullgraph": self.fullgraph}
        if self.options:
            kw["options"] = dict(self.options)
        elif self.mode != "default":
            kw["mode"] = self.mode
        return torch.compile(fn, **kw)


def resolve_compile(value: bool | str | Mapping[str, Any] | CompileConfig | None
                    ) -> CompileConfig | None:
    """``False``/``None``: no compile; ``True``: the defaults; a mode name; a dict of
    ``CompileConfig`` fields; or a ``CompileConfig``."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileConfig()
    if isinstance(value, CompileConfig):
        return value
    if isinstance(value, str):
        return CompileConfig(mode=value)
    if isinstance(value, Mapping):
        unknown = set(value) - {"mode", "backend", "dynamic", "fullgraph", "options"}
        if unknown:
            raise CompileError(f"unknown compile options {sorted(unknown)}; use mode, backend, "
                               f"dynamic, fullgraph, options")
        return CompileConfig(**value)
    raise CompileError(f"compile must be a bool, a mode name, a dict or a CompileConfig, got "
                       f"{type(value).__name__}")


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
