"""``routesurgeon inspect``: the sharing summary of a model (table, JSON, GraphML, tree)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from routesurgeon.cli._loading import Loaded, _load, _model_args
from routesurgeon.cli._output import EXIT_OK, _line, _pct, _si


def inspect_data(loaded: Loaded) -> dict[str, Any]:
    """The machine-readable summary ``inspect --json`` prints."""
    s = loaded.surgeon
    topo = s.topology
    layers = topo.layers()
    filter_layers = [la for la in layers if la.shared_filters is not None and la.out_channels]
    channels = sum(la.out_channels or 0 for la in filter_layers)
    shared_channels = sum(la.shared_filters or 0 for la in filter_layers)
    per_task = topo.summary()
    for t, row in per_task.items():
        row["channels"] = sum(la.out_channels or 0 for la in filter_layers if t in la.tasks)
    return {
        "format": "routesurgeon.inspect/1",
        "model": loaded.spec,
        "class": type(s.model).__name__,
        "input_shapes": loaded.input_shapes,
        "tasks": list(s.tasks),
        "trace": {
            "path": s.trace_path,
            "leaves": list(s.traced.leaves),
            "specializations": list(s.traced.specializations),
            "seconds": {k: round(v, 4) for k, v in s.timings.items()},
            "build_and_trace_seconds": round(loaded.build_seconds, 4),
        },
        "totals": {
            "nodes": topo.graph.number_of_nodes(),
            "layers": len(layers),
            "shared_layers": sum(la.shared for la in layers),
            "channels": channels,
            "shared_channels": shared_channels,
            "shared_channel_fraction": shared_channels / channels if channels else 0.0,
            "params": topo.total_params(),
            "flops": topo.total_flops(),
        },
        "per_task": per_task,
    }


def _inspect_table(data: dict[str, Any]) -> Table:
    table = Table(title=f"{data['model']} ({data['class']}): sharing by task")
    table.add_column("task", style="bold")
    for col in (
        "layers",
        "shared",
        "exclusive",
        "channels",
        "shared ch.",
        "params",
        "% params",
        "FLOPs",
        "% FLOPs",
    ):
        table.add_column(col, justify="right")
    for t, r in data["per_task"].items():
        table.add_row(
            t,
            str(r["layers"]),
            str(r["shared_layers"]),
            str(r["exclusive_layers"]),
            str(r["channels"]),
            _pct(r["shared_filter_fraction"]),
            _si(r["params"]),
            _pct(r["param_share"]),
            _si(r["flops"]),
            _pct(r["flop_share"]),
        )
    return table


def _totals_line(data: dict[str, Any]) -> str:
    tot = data["totals"]
    return (
        f"{tot['layers']} layers ({tot['shared_layers']} shared by 2+ tasks), "
        f"{tot['channels']} channels ({_pct(tot['shared_channel_fraction'])} shared), "
        f"{_si(tot['params'])} params, {_si(tot['flops'])} FLOPs per sample (2 x MACs)"
    )


def _trace_line(data: dict[str, Any]) -> str:
    tr = data["trace"]
    sec = tr["seconds"]
    shapes = ", ".join("x".join(map(str, s)) for s in data["input_shapes"])
    line = (
        f"traced by {tr['path']} on input {shapes}: trace {sec['trace']:.2f} s, graph run "
        f"{sec.get('run', 0.0):.2f} s, verify {sec['verify']:.2f} s, analyse "
        f"{sec['analyse']:.2f} s "
        f"(build + trace {tr['build_and_trace_seconds']:.2f} s)"
    )
    if tr["leaves"]:
        line += f"; opaque leaves: {', '.join(tr['leaves'])}"
    if tr["specializations"]:
        line += f"; specialised on the example shape ({len(tr['specializations'])} checks)"
    return line


def _cmd_inspect(args: argparse.Namespace, out: Console, err: Console) -> int:
    loaded = _load(args, err)
    data = inspect_data(loaded)
    if args.graphml:
        loaded.surgeon.topology.to_graphml(args.graphml)
    if args.topology_json:
        loaded.surgeon.topology.to_json(args.topology_json)
    if args.json == "-":
        out.file.write(json.dumps(data, indent=1) + "\n")
        return EXIT_OK
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    out.print(_inspect_table(data))
    _line(out, _totals_line(data))
    _line(out, _trace_line(data))
    if args.tree:
        from routesurgeon.viz import text_tree

        out.file.write(text_tree(loaded.surgeon.topology, depth=args.tree_depth) + "\n")
    for what, path in (
        ("JSON", args.json),
        ("GraphML", args.graphml),
        ("topology JSON", args.topology_json),
    ):
        if path:
            _line(out, f"wrote {what} to {path}")
    return EXIT_OK


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], debug: argparse.ArgumentParser
) -> None:
    """The ``inspect`` subcommand (``debug``: the parent parser adding ``--debug``)."""
    p = sub.add_parser(
        "inspect",
        parents=[debug],
        help="print the sharing summary of a model",
        description="Build a model by name, trace it and print which layers, "
        "channels, parameters and FLOPs each task uses and shares.",
    )
    _model_args(p)
    p.add_argument("--json", metavar="PATH|-", help="write the summary as JSON ('-': stdout only)")
    p.add_argument("--graphml", metavar="PATH", help="write the sharing graph as GraphML")
    p.add_argument(
        "--topology-json",
        metavar="PATH",
        help="write the sharing graph as JSON (routesurgeon.Topology.from_json)",
    )
    p.add_argument("--tree", action="store_true", help="print the module tree with task markers")
    p.add_argument(
        "--tree-depth",
        type=int,
        default=None,
        metavar="D",
        help="levels of the --tree (default: automatic)",
    )
    p.set_defaults(run=_cmd_inspect)
