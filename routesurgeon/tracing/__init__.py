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

from routesurgeon.tracing import proxy_patches as _proxy_patches  # noqa: F401  (installs patches)
from routesurgeon.tracing.api import TraceResult, trace
from routesurgeon.tracing.inputs import ExampleInputs, bind_inputs, normalize_inputs
from routesurgeon.tracing.modes import mode, preserved
from routesurgeon.tracing.tracer import RouteTracer

__all__ = [
    "ExampleInputs",
    "RouteTracer",
    "TraceResult",
    "bind_inputs",
    "mode",
    "normalize_inputs",
    "preserved",
    "trace",
]
