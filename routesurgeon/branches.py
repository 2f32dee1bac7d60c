"""Branch points of a traced multi-output graph: where it forks towards different task sets.

Methods that act on the gradient flowing back along a branch (IMTA's gradient equilibrium, the
branch mode of ``drmgf-step``) rewrite the graph with one op on every such edge; this module does
the rewriting once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.fx as fx

__all__ = ["EdgeOp", "on_branch_edges"]

EdgeOp = Callable[[fx.Graph, fx.Node, fx.Node, int, int], fx.Node]
"""``(new_graph, copied_value, original_source, point_tasks, branch_tasks) -> new node``; the
task sets are bit sets as :func:`routesurgeon.topology.node_reach` gives them."""


def on_branch_edges(gm: fx.GraphModule, reach: Mapping[fx.Node, int], op: EdgeOp) -> fx.Graph:
    """A copy of ``gm.graph`` (no owning module) where every value that reaches two or more tasks
    and feeds a user reaching a strict, non-empty subset of them goes through ``op`` first.

    One ``op`` node is made per (value, branch task set) and shared by the users with that set.
    Parameters and buffers (``get_attr``) are not branch points: only activations are.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    made: dict[tuple[fx.Node, int], fx.Node] = {}

    def arg_for(user: fx.Node) -> Callable[[fx.Node], fx.Node]:
        def lookup(a: fx.Node) -> fx.Node:
            total = reach.get(a, 0)
            part = reach.get(user, 0) if user.op != "output" else total
            if a.op == "get_attr" or total.bit_count() <= 1 or part in (0, total):
                return env[a]
            key = (a, part)
            if key not in made:
                made[key] = op(graph, env[a], a, total, part)
            return made[key]

        return lookup

    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            env[n] = graph.node_copy(n, lambda a: env[a])
        else:
            env[n] = graph.node_copy(n, arg_for(n))
    return graph
