"""Walk a traced graph once with the channel rules and group coupled channels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.fx as fx

from routesurgeon.channels.registry import opaque, rule_for
from routesurgeon.channels.state import AnalysisState, Space
from routesurgeon.outputs import OutputSpec

__all__ = ["ChannelGroups", "analyse_channels"]

log = logging.getLogger(__name__)


@dataclass
class ChannelGroups:
    """Coupled channel groups of a traced graph.

    ``labels[id]`` is the group of channel id ``id``. A group is pruned or kept as a whole. A group
    is *fixed* (never pruned) when any op touching it has channel semantics routesurgeon does not
    know, or it reaches a model output; ``reasons`` says why. ``reach[g]`` is the bit set of tasks
    the group's channels influence.
    """

    state: AnalysisState
    labels: np.ndarray
    n_groups: int
    fixed: np.ndarray  # bool per group
    reasons: dict[int, str]
    reach: np.ndarray  # int64 task bits per group
    tasks: tuple[str, ...]

    # -- views -------------------------------------------------------------------------------
    @property
    def spaces(self) -> dict[fx.Node, Any]:
        return self.state.spaces

    @property
    def layers(self) -> dict[fx.Node, dict[str, Any]]:
        return self.state.layers

    def groups_of(self, ids: np.ndarray) -> np.ndarray:
        return self.labels[ids]

    def prunable(self) -> np.ndarray:
        """Indices of the groups that may be pruned."""
        return np.flatnonzero(~self.fixed)

    def shared_groups(self) -> np.ndarray:
        """Prunable groups that two or more tasks reach."""
        bits = self.reach
        shared = np.array([bin(int(b)).count("1") >= 2 for b in bits], dtype=bool)
        return np.flatnonzero(shared & ~self.fixed)

    def filter_tasks(self, node: fx.Node) -> list[frozenset[str]]:
        """For a conv/linear node, the tasks each output channel (filter) reaches."""
        out = self.state.layers[node]["out"]
        return [self._bits_to_tasks(int(self.reach[g])) for g in self.labels[out]]

    def _bits_to_tasks(self, bits: int) -> frozenset[str]:
        return frozenset(t for i, t in enumerate(self.tasks) if bits >> i & 1)

    def group_members(self) -> dict[int, list[tuple[str, int, np.ndarray]]]:
        """Per group, the (parameter path, axis, positions) it occupies."""
        out: dict[int, list[tuple[str, int, np.ndarray]]] = {}
        for (path, axis), ids in self.state.params.items():
            labels = self.labels[ids]
            for g in np.unique(labels):
                out.setdefault(int(g), []).append((path, axis, np.flatnonzero(labels == g)))
        return out

    def summary(self) -> dict[str, int]:
        sizes = np.bincount(self.labels, minlength=self.n_groups)
        return {
            "channels": len(self.labels),
            "groups": int(self.n_groups),
            "fixed_groups": int(self.fixed.sum()),
            "prunable_channels": int(sizes[~self.fixed].sum()),
            "shared_prunable_groups": len(self.shared_groups()),
        }


def analyse_channels(
    gm: fx.GraphModule, node_reach: dict[fx.Node, int], outputs: OutputSpec
) -> ChannelGroups:
    """Run the channel rules over ``gm`` (whose nodes carry ``rs_shape`` meta)."""
    st = AnalysisState(gm=gm, node_reach=node_reach)
    frozen: set[str] = set()
    task_bit = {t: 1 << i for i, t in enumerate(outputs.tasks)}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            st.spaces[node] = None
            continue
        if node.op == "output":
            for name, leaf in zip(outputs.names, outputs.nodes):
                s = st.space(leaf)
                if s is None:
                    continue
                st.fix(s.ids, f"model output {name!r}")
                bits = sum(task_bit[t] for t, o in zip(outputs.tasks, outputs.task_outputs)
                           if o == name)
                st.consumed.append((s.ids, bits))
            continue
        rule, extra = rule_for(node, gm)
        if rule is None:
            rule, extra = opaque, ()
        if rule is opaque:
            frozen.update(str(a.target) for a in node.all_input_nodes if a.op == "get_attr")
            if node.op == "call_module":
                frozen.add(str(node.target))
        rule(st, node, *extra)
    labels, k = st.components()
    fixed = np.zeros(k, dtype=bool)
    reasons: dict[int, str] = {}
    for ids, reason in st.fixed:
        for g in np.unique(labels[ids]):
            if not fixed[g]:
                fixed[g] = True
                reasons[int(g)] = reason
    for (path, _axis), ids in st.params.items():
        if any(path == f or path.startswith(f + ".") for f in frozen):
            for g in np.unique(labels[ids]):
                if not fixed[g]:
                    fixed[g] = True
                    reasons[int(g)] = f"parameter {path!r} is also used by an opaque op"
    reach = np.zeros(k, dtype=np.int64)
    for ids, bits in st.consumed:
        if bits and len(ids):
            np.bitwise_or.at(reach, labels[ids], bits)
    kept_whole: dict[str, int] = {}
    for why in reasons.values():
        if not why.startswith("model output"):
            kept_whole[why] = kept_whole.get(why, 0) + 1
    for why, n in kept_whole.items():
        log.info("channel group%s kept whole (never pruned): %s", "s" * (n > 1), why)
    return ChannelGroups(st, labels, k, fixed, reasons, reach, tuple(outputs.tasks))


def space_of(groups: ChannelGroups, node: fx.Node) -> Space | None:
    s = groups.spaces.get(node)
    return s if isinstance(s, Space) else None
