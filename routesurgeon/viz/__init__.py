"""Visual reports of a multi-output model: HTML report, static pictures, DOT, text trees, data.

* :func:`surgeon_report` (``Surgeon.report``): one self-contained, offline HTML file from a
  surgeon, a training history and exported routes; :func:`write_report` /
  :func:`render_report` do the same from a topology and plain dicts.
* :func:`save_heatmap`, :func:`save_topology`: matplotlib PNG/SVG/PDF (needs ``matplotlib``).
* :func:`to_dot`, :func:`save_dot`: Graphviz DOT (rendered when ``dot`` is installed).
* :func:`text_tree`: a compact text tree of the module hierarchy with task markers.
* :func:`route_graph`, :func:`save_route_graph`, :func:`load_route_graph`: a task's route as a
  networkx graph, in JSON or GraphML; :func:`route_costs`: params/FLOPs/latency per route.
"""

from routesurgeon.viz.api import surgeon_report
from routesurgeon.viz.costs import graph_cost, route_costs
from routesurgeon.viz.layout import Hierarchy, layered_layout
from routesurgeon.viz.report import render_report, synthetic_data, task_colours, write_report
from routesurgeon.viz.routegraph import load_route_graph, route_graph, save_route_graph
from routesurgeon.viz.static import save_dot, save_heatmap, save_topology, text_tree, to_dot

__all__ = [
    "Hierarchy",
    "graph_cost",
    "layered_layout",
    "load_route_graph",
    "render_report",
    "route_costs",
    "route_graph",
    "save_dot",
    "save_heatmap",
    "save_route_graph",
    "save_topology",
    "surgeon_report",
    "synthetic_data",
    "task_colours",
    "text_tree",
    "to_dot",
    "write_report",
]
