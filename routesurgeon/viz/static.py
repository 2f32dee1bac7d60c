"""Static pictures and text views of a topology: matplotlib PNG/SVG, Graphviz DOT, a text tree.

* :func:`save_heatmap`: layer x task mean importance (or one layer's per-channel importance).
* :func:`save_topology`: the collapsed, layered sharing graph (same layout as the HTML report).
* :func:`to_dot` / :func:`save_dot`: the same graph as Graphviz DOT (rendered when ``dot`` is
  installed).
* :func:`text_tree`: the module hierarchy with task markers, for terminals and logs.

matplotlib is imported lazily with the Agg backend (no display needed); the figures are
created with :class:`matplotlib.figure.Figure` directly, so pyplot's global state is untouched.

The renderers live in :mod:`~routesurgeon.viz.heatmap`, :mod:`~routesurgeon.viz.topology_plot`,
:mod:`~routesurgeon.viz.dot` and :mod:`~routesurgeon.viz.texttree`; this module gathers them.
"""

from __future__ import annotations

from routesurgeon.viz.dot import save_dot, to_dot
from routesurgeon.viz.heatmap import save_heatmap
from routesurgeon.viz.texttree import text_tree
from routesurgeon.viz.topology_plot import save_topology

__all__ = ["save_dot", "save_heatmap", "save_topology", "text_tree", "to_dot"]
