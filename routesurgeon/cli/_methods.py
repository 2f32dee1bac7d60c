"""``routesurgeon methods``: the training methods ``Trainer`` accepts."""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from routesurgeon.cli._output import EXIT_OK


def _first_paragraph(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _cmd_methods(args: argparse.Namespace, out: Console, err: Console) -> int:
    from routesurgeon.methods.registry import available_methods, get_method_class

    names = available_methods()
    if args.json == "-":
        data = {n: _first_paragraph(get_method_class(n)) for n in names}
        out.file.write(json.dumps(data, indent=1) + "\n")
        return EXIT_OK
    table = Table(title="training methods (Trainer(..., method=NAME))")
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("description")
    for n in names:
        table.add_row(n, _first_paragraph(get_method_class(n)))
    out.print(table)
    return EXIT_OK


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], debug: argparse.ArgumentParser
) -> None:
    """The ``methods`` subcommand (``debug``: the parent parser adding ``--debug``)."""
    p = sub.add_parser(
        "methods",
        parents=[debug],
        help="list the training methods",
        description="List the methods routesurgeon.Trainer accepts.",
    )
    p.add_argument("--json", metavar="-", choices=["-"], help="print them as JSON")
    p.set_defaults(run=_cmd_methods)
