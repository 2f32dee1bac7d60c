"""``routesurgeon viz``: the self-contained HTML report of a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from routesurgeon.cli._checkpoint import _apply_checkpoint, _check_file
from routesurgeon.cli._loading import _keep, _load, _model_args
from routesurgeon.cli._output import EXIT_OK, _line, _status
from routesurgeon.errors import InputError


def _cmd_viz(args: argparse.Namespace, out: Console, err: Console) -> int:
    path = Path(args.out)
    if path.exists() and not args.overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    _check_file(args.checkpoint)  # before the (slow) build and trace
    loaded = _load(args, err)
    s = loaded.surgeon
    history = _apply_checkpoint(s, args.checkpoint) if args.checkpoint else None
    routes = None
    if args.keep is not None:
        scores = "importance" if s.route_scores() is not None else "magnitude"
        with _status(err, f"exporting routes (keep {args.keep}, {scores} scores)"):
            routes = s.export_routes(keep=args.keep, scores=scores)
    with _status(err, f"writing {path}"):
        written = Path(
            s.report(
                path, history=history, routes=routes, title=f"routesurgeon report · {loaded.spec}"
            )
        )
    size = written.stat().st_size
    shown = ["topology"]
    if s.route_scores() is not None:
        shown.append("learned importance")
    if history:
        shown.append(f"training history ({len(history)} epochs)")
    if routes:
        shown.append(f"{len(routes)} routes")
    _line(
        out,
        f"wrote {written} ({size / 1e6:.2f} MB: {', '.join(shown)}); it opens offline in a browser",
    )
    return EXIT_OK


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], debug: argparse.ArgumentParser
) -> None:
    """The ``viz`` subcommand (``debug``: the parent parser adding ``--debug``)."""
    p = sub.add_parser(
        "viz",
        parents=[debug],
        help="write the HTML report of a model",
        description="Write one self-contained HTML report (sharing graph, "
        "importance, routes, training curves) that opens offline.",
    )
    _model_args(p)
    p.add_argument("--out", required=True, metavar="report.html", help="HTML file to write")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a Trainer.save_checkpoint file: show its weights' learned importance "
        "and its training history",
    )
    p.add_argument(
        "--keep",
        type=_keep,
        default=None,
        help="also export the routes keeping this fraction of shared channels and "
        "show them (learned importance with --checkpoint, else magnitude)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(run=_cmd_viz)
