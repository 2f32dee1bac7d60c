"""Which candidate channel groups a route keeps, given one score per group.

``select="layer"`` keeps the best ``keep`` fraction of each layer's candidate output groups (at
least one); ``select="global"`` ranks every candidate group of the route at once by its score
divided by the mean candidate score of its layer (torch-pruning's ``normalizer="mean"``, so that
layers whose scores have different scales compete fairly) and keeps the best ``keep`` fraction,
still at least one group per layer. ``threshold`` keeps per layer the groups scoring at least it.
A budget (``budget_flops`` / ``budget_params``) searches the largest ``keep`` level of either
selection whose route fits (``routesurgeon.budgets.fit_budget``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from routesurgeon.errors import InputError

__all__ = ["SELECTIONS", "Selector", "keep_an_input"]

SELECTIONS = ("layer", "global")


@dataclass
class Selector:
    """Per-level selection for one task: ``candidate``/``base`` masks over groups, the group
    scores, and the candidate groups of each layer's output."""

    groups: Any  # ChannelGroups
    candidate: np.ndarray
    base: np.ndarray  # groups pruned whatever the level (the task never reaches them)
    score: np.ndarray  # per group; inf = always keep
    select: str = "layer"

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise InputError(f"unknown select {self.select!r}; use one of {list(SELECTIONS)}")
        g = self.groups
        self.layer_cands: list[np.ndarray] = []
        for info in g.layers.values():
            if info["kind"] == "norm":
                continue
            labels = g.labels[info["out"]]
            cand = np.unique(labels[self.candidate[labels]])
            if len(cand):
                order = np.argsort(-self.score[cand], kind="stable")
                self.layer_cands.append(cand[order])
        if self.select == "global":
            norm = np.full(g.n_groups, -np.inf)
            for cand in self.layer_cands:
                sc = self.score[cand]
                finite = sc[np.isfinite(sc)]
                mean = float(np.mean(finite)) if len(finite) else 1.0
                scale = 1.0 / mean if mean > 0 else 1.0
                norm[cand] = np.maximum(norm[cand], np.where(np.isfinite(sc), sc * scale, np.inf))
            all_cands = np.flatnonzero(self.candidate)
            self.global_order = all_cands[np.argsort(-norm[all_cands], kind="stable")]

    def kept(self, level: float, threshold: float | None = None) -> np.ndarray:
        """Candidate groups kept at ``level`` (bool per group)."""
        keep = np.zeros(self.groups.n_groups, dtype=bool)
        for cand in self.layer_cands:
            if threshold is not None:
                chosen = cand[self.score[cand] >= threshold]
                keep[chosen if len(chosen) else cand[:1]] = True
            elif self.select == "layer":
                keep[cand[:max(1, math.ceil(level * len(cand) - 1e-9))]] = True
            else:
                keep[cand[0]] = True  # every layer keeps its best group
        if threshold is None and self.select == "global":
            n = math.ceil(level * len(self.global_order) - 1e-9)
            keep[self.global_order[:n]] = True
        keep |= np.isinf(self.score) & self.candidate  # unscored: kept
        return keep

    def pruned(self, kept: np.ndarray) -> np.ndarray:
        pruned = self.base | (self.candidate & ~kept)
        keep_an_input(self.groups, pruned, self.candidate, self.score)
        return pruned


def keep_an_input(groups: Any, pruned: np.ndarray, candidate: np.ndarray,
                  group_score: np.ndarray) -> None:
    """A layer the route keeps must keep an input channel: un-prune its best candidate input group.

    Per-layer ``keep`` counts only a layer's *output* groups; an input group (e.g. the one channel
    a split hands to a branch) can still be dropped whole, leaving a conv with no inputs. Repeat
    until no kept layer has every input pruned (only un-prunes, so it terminates).
    """
    changed = True
    while changed:
        changed = False
        for info in groups.layers.values():
            if info["kind"] == "norm" or len(info["in"]) == 0:
                continue
            if pruned[groups.labels[info["out"]]].all():
                continue  # the layer is not on the route
            ins = np.unique(groups.labels[info["in"]])
            if not pruned[ins].all():
                continue
            cand = ins[candidate[ins]]
            if len(cand):
                pruned[cand[int(np.argmax(group_score[cand]))]] = False
                changed = True
