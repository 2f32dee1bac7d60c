"""State of the channel analysis: channel ids on every tensor, couplings, fixed channels.

Every tracked tensor carries a *channel space*: the axis that holds its channels and, for each
position along that axis, a channel id. Ops that create channels (conv, linear) allocate fresh ids;
ops that keep channels pass ids through; ops that tie channels (residual add, depthwise conv, SE
gating) *couple* ids, so they are pruned together; ops whose channel semantics are not known *fix*
the ids they touch, so they are never pruned. Pruning a set of coupled ids removes every position
carrying them, everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx as fx

__all__ = ["AnalysisState", "ParamSlice", "Space"]


@dataclass(frozen=True)
class Space:
    """Channel ids along ``axis`` of a tensor (``ids[i]`` is the id at position ``i``)."""

    axis: int
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ParamSlice:
    """Positions along ``axis`` of the parameter or buffer at ``path`` carry channel ``ids``."""

    path: str
    axis: int
    ids: np.ndarray


@dataclass
class AnalysisState:
    """Mutable state the channel rules write into while walking the graph once."""

    gm: fx.GraphModule
    node_reach: dict[fx.Node, int]
    spaces: dict[fx.Node, Any] = field(default_factory=dict)  # Space | list[Space|None] | None
    n_ids: int = 0
    _couple_a: list[np.ndarray] = field(default_factory=list)
    _couple_b: list[np.ndarray] = field(default_factory=list)
    fixed: list[tuple[np.ndarray, str]] = field(default_factory=list)
    consumed: list[tuple[np.ndarray, int]] = field(default_factory=list)  # ids, task bits
    params: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    layers: dict[fx.Node, dict[str, Any]] = field(default_factory=dict)
    rewrites: dict[fx.Node, tuple[str, Any]] = field(default_factory=dict)
    masks_at: dict[fx.Node, list[tuple[int, Space]]] = field(default_factory=dict)
    pending: dict[fx.Node, Space] = field(default_factory=dict)  # spaces set ahead by a pattern
    pinned: dict[str, str] = field(default_factory=dict)  # parameter path -> why never sliced

    # -- ids -------------------------------------------------------------------------------
    def new_ids(self, n: int) -> np.ndarray:
        ids = np.arange(self.n_ids, self.n_ids + n, dtype=np.int64)
        self.n_ids += n
        return ids

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise AssertionError(f"coupling {len(a)} with {len(b)} channels")
        self._couple_a.append(np.asarray(a))
        self._couple_b.append(np.asarray(b))

    def fix(self, ids: np.ndarray, reason: str) -> None:
        if len(ids):
            self.fixed.append((np.asarray(ids), reason))

    def consume(self, node: fx.Node, ids: np.ndarray) -> None:
        """``node`` uses channels ``ids`` (they reach whatever ``node`` reaches)."""
        self.consumed.append((np.asarray(ids), self.node_reach.get(node, 0)))

    def slice_param(self, path: str, axis: int, ids: np.ndarray) -> None:
        """Record that ``path`` has channel ``ids`` along ``axis``; repeated uses are coupled."""
        key = (path, axis)
        if key in self.params:
            self.couple(self.params[key], ids)
        else:
            self.params[key] = np.asarray(ids)

    def pin(self, path: str, reason: str) -> None:
        """``path`` is used somewhere whole: whatever channels it carries elsewhere are fixed."""
        self.pinned.setdefault(path, reason)

    def mask_input(self, node: fx.Node, arg_index: int, space: Space) -> None:
        """The masked reference zeroes pruned channels of ``node``'s input ``arg_index``."""
        self.masks_at.setdefault(node, []).append((arg_index, space))

    # -- spaces ------------------------------------------------------------------------------
    def space(self, arg: Any) -> Space | None:
        if isinstance(arg, fx.Node):
            s = self.spaces.get(arg)
            return s if isinstance(s, Space) else None
        return None

    def fix_node(self, arg: Any, reason: str, consumer: fx.Node | None = None) -> None:
        s = self.space(arg)
        if s is not None:
            self.fix(s.ids, reason)
            if consumer is not None:
                self.consume(consumer, s.ids)

    def components(self) -> tuple[np.ndarray, int]:
        """Connected components of the coupling graph: (label per id, number of labels)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        for (path, _axis), ids in self.params.items():
            if path in self.pinned:
                self.fix(ids, self.pinned[path])
        n = self.n_ids
        if n == 0:
            return np.zeros(0, dtype=np.int64), 0
        if self._couple_a:
            a = np.concatenate(self._couple_a)
            b = np.concatenate(self._couple_b)
        else:
            a = b = np.zeros(0, dtype=np.int64)
        m = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        k, labels = connected_components(m, directed=False)
        return labels.astype(np.int64), int(k)
