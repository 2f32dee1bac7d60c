"""``routesurgeon export``: prune, verify, measure and save one route per task."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from routesurgeon.cli._checkpoint import _apply_checkpoint, _check_file
from routesurgeon.cli._loading import _formats, _keep, _load, _model_args, _positive_int
from routesurgeon.cli._output import EXIT_OK, _line, _pct, _si, _status
from routesurgeon.errors import InputError

# criteria that read the learned importance variables (need a trained run's checkpoint)
_LEARNED = ["importance", "learned", "raw-importance"]


def _kept_fraction(route: nn.Module) -> float:
    info = getattr(route, "meta", {}).get("routesurgeon")
    return float(info.mask.kept_fraction) if info is not None else float("nan")


def _routes_table(
    title: str, rows: Sequence[Mapping[str, Any]], kept: Mapping[str, float]
) -> Table:
    table = Table(title=title)
    table.add_column("route", style="bold")
    for col in (
        "kept channels",
        "params",
        "% of full",
        "FLOPs",
        "% of full",
        "latency ms",
        "x full",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        frac = kept.get(r["name"])
        table.add_row(
            str(r["name"]),
            "" if frac is None else _pct(frac),
            _si(r["params"]),
            _pct(r["params_frac"]),
            _si(r["flops"]),
            _pct(r["flops_frac"]),
            f"{r['latency_ms']:.2f}",
            f"{r['latency_ratio']:.2f}",
        )
    return table


def _cmd_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    from routesurgeon.report import route_report
    from routesurgeon.saving import save_routes

    keep_all = args.threshold is None and args.keep >= 1.0  # keeps every channel: no scores
    if args.scores in _LEARNED and not args.checkpoint and not keep_all:
        raise InputError(
            f"--scores {args.scores} needs --checkpoint PATH (a run trained with "
            "drmgf or drmgf-step); a freshly built model has only magnitude, group-magnitude "
            "or random scores"
        )
    _check_file(args.checkpoint)  # before the (slow) build and trace
    out_dir = Path(args.out)
    loaded = _load(args, err)
    s = loaded.surgeon
    if not args.overwrite:
        taken = [str(out_dir / t) for t in s.tasks if (out_dir / t / "manifest.json").exists()]
        if taken:
            raise InputError(
                f"routes are already saved in {taken[:3]}; pass --overwrite to "
                f"replace them, or choose another --out"
            )
    if args.checkpoint:
        _apply_checkpoint(s, args.checkpoint)
    keep = None if args.threshold is not None else args.keep  # a threshold replaces --keep
    with _status(err, f"exporting {len(s.tasks)} routes (pruning and verifying)"):
        routes = s.export_routes(keep=keep, threshold=args.threshold, scores=args.scores)
        union = (
            s.export_routes(keep=keep, threshold=args.threshold, scores=args.scores, union=True)
            if args.union
            else None
        )
    with _status(err, "measuring params, FLOPs and latency"):
        rows = route_report(s, routes, union=union, repeats=args.latency_repeats)
    kept = {t: _kept_fraction(r) for t, r in routes.items()}
    if union is not None:
        kept["union"] = _kept_fraction(union)
    to_save: dict[str, nn.Module] = dict(routes)
    if union is not None:
        to_save["+".join(s.tasks)] = union
    with _status(err, f"saving routes to {out_dir}"):
        manifests = save_routes(
            to_save,
            out_dir,
            surgeon=s,
            source=loaded.spec,
            formats=args.formats,
            overwrite=args.overwrite,
        )
    what = f"threshold {args.threshold}" if args.threshold is not None else f"keep {args.keep}"
    out.print(_routes_table(f"{loaded.spec}: routes ({what}, scores {args.scores})", rows, kept))
    _line(
        out,
        f"FLOPs per forward on input "
        f"{', '.join('x'.join(map(str, sh)) for sh in loaded.input_shapes)} (2 x MACs); "
        f"latency: median of {args.latency_repeats} forwards on "
        f"{rows[0]['device'] if rows else 'cpu'}",
    )
    for name, manifest in manifests.items():
        _line(out, f"saved {name}: {manifest.parent}")
    return EXIT_OK


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], debug: argparse.ArgumentParser
) -> None:
    """The ``export`` subcommand (``debug``: the parent parser adding ``--debug``)."""
    p = sub.add_parser(
        "export",
        parents=[debug],
        help="export and save one pruned route per task",
        description="Prune each task's route (keeping the best-scoring shared "
        "channels), verify it against its masked reference and save it.",
    )
    _model_args(p)
    p.add_argument(
        "--keep",
        type=_keep,
        default=0.5,
        help="fraction of each shared layer's channels a route keeps (default 0.5)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="keep shared channels whose score passes this instead of --keep",
    )
    p.add_argument(
        "--scores",
        choices=["magnitude", "group-magnitude", "random", *_LEARNED],
        default="magnitude",
        help="channel scores without data: weight magnitude (default), coupled-group magnitude, "
        "random, or learned ones from --checkpoint (importance/learned: DR-MGF dominance; "
        "raw-importance: the learned |A_t|). Data-driven criteria (taylor, snip, disparse): "
        "routesurgeon.criterion_scores in Python",
    )
    p.add_argument(
        "--union",
        action="store_true",
        help="also export one graph serving every task (the union of the routes)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a Trainer.save_checkpoint file: its weights and learned importance",
    )
    p.add_argument(
        "--latency-repeats",
        type=_positive_int,
        default=5,
        metavar="N",
        help="CPU forwards timed per route (median; default 5)",
    )
    p.add_argument(
        "--formats",
        type=_formats,
        default=("pt", "pt2", "onnx"),
        metavar="pt,pt2,onnx",
        help="files saved per route (default all: torch.save, torch.export, ONNX "
        "verified by onnxruntime; pt is always saved)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to save the routes in")
    p.add_argument("--overwrite", action="store_true", help="replace routes already in DIR")
    p.set_defaults(run=_cmd_export)
