"""Task names for a model's outputs and the graph nodes that produce them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from routesurgeon.errors import TaskError

__all__ = ["OutputSpec", "output_names", "resolve_tasks"]


def _key_name(key: Any, top: bool) -> str:
    if isinstance(key, pytree.MappingKey):
        return str(key.key)
    if isinstance(key, pytree.SequenceKey):
        return f"out{key.idx}" if top else str(key.idx)
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return str(key).strip(".[]")


def output_names(structure: Any) -> list[tuple[str, Any]]:
    """Leaves of an output structure with their names.

    Dict keys name their values; tuples and lists name theirs ``out0``, ``out1``, ... at the top
    level and by index below it; nested names are joined with dots (``"aux.0"``).
    """
    leaves, _ = pytree.tree_flatten_with_path(structure)
    named = []
    for path, leaf in leaves:
        if not path:
            named.append(("out", leaf))
            continue
        parts = [_key_name(k, i == 0) for i, k in enumerate(path)]
        named.append((".".join(parts), leaf))
    return named


def _namedtuple_type(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields")


def expand_namedtuples(structure: Any) -> Any:
    """``structure`` with fx's namedtuple-construction nodes (fx records a returned namedtuple,
    e.g. torchvision's ``GoogLeNetOutputs``, as a call to its class) replaced by the namedtuple
    of their arguments, so its fields name the outputs as they do at run time."""
    def expand(x: Any) -> Any:
        if isinstance(x, fx.Node) and x.op == "call_function" and _namedtuple_type(x.target):
            cls = x.target
            return cls(*[pytree.tree_map(expand, a) for a in x.args],  # type: ignore[operator]
                       **{k: pytree.tree_map(expand, v) for k, v in x.kwargs.items()})
        return x

    return pytree.tree_map(expand, structure, is_leaf=lambda v: isinstance(v, fx.Node))


@dataclass(frozen=True)
class OutputSpec:
    """The graph's outputs: every named leaf and which of them are tasks."""

    names: tuple[str, ...]  # every tensor output leaf, in output order
    nodes: tuple[fx.Node, ...]  # the node producing each of them
    tasks: tuple[str, ...]  # task names, in output order
    task_outputs: tuple[str, ...]  # for each task, the output leaf name it is

    def node_of(self, task: str) -> fx.Node:
        return self.nodes[self.names.index(self.task_outputs[self.tasks.index(task)])]


def resolve_tasks(
    graph: fx.Graph, tasks: Sequence[str] | Mapping[str, str] | None
) -> OutputSpec:
    """Match user task names to the graph's output leaves.

    ``tasks`` may be ``None`` (every tensor output is a task, named by the output structure), a
    list of output names (a subset, in any order), a list of new names for all outputs in order
    (for tuple outputs), or a dict ``{task: output name}``.
    """
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    named = [(name, leaf) for name, leaf in output_names(expand_namedtuples(out_node.args[0]))
             if isinstance(leaf, fx.Node)]
    if not named:
        raise TaskError("the model returns no tensor outputs, so there are no tasks to analyse")
    names = [n for n, _ in named]
    nodes = [leaf for _, leaf in named]
    if tasks is None:
        task_names, task_outputs = list(names), list(names)
    elif isinstance(tasks, Mapping):
        task_names, task_outputs = list(tasks.keys()), list(tasks.values())
    else:
        task_names = list(tasks)
        if len(task_names) == len(names) and not set(task_names) <= set(names):
            task_outputs = list(names)  # positional renaming
        else:
            task_outputs = list(task_names)
    dup = sorted({t for t in task_names if task_names.count(t) > 1})
    if dup:
        raise TaskError(f"task names must be unique; repeated: {dup}")
    for t, o in zip(task_names, task_outputs):
        if o not in names:
            raise TaskError(
                f"task {t!r} matches no output of the model; available outputs: {names}. Pass "
                f"tasks=None to use them all, a subset of them, one new name per output in order, "
                f"or a dict {{task: output}}."
            )
    if len(task_names) < 1:
        raise TaskError("at least one task is needed")
    order = sorted(range(len(task_names)), key=lambda i: names.index(task_outputs[i]))
    return OutputSpec(
        names=tuple(names),
        nodes=tuple(nodes),
        tasks=tuple(task_names[i] for i in order),
        task_outputs=tuple(task_outputs[i] for i in order),
    )


def leaf_values(structure: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors of an output structure for the given leaf names."""
    table = dict(output_names(structure))
    return {n: table[n] for n in names}
