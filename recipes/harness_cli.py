"""The command line every recipe shares: its options and the preset they select (see
``harness``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any


def recipe_parser(doc: str | None, out: str, presets: Iterable[str],
                  quick_help: str = "the CI-sized run (preset quick)") -> argparse.ArgumentParser:
    """The options every recipe takes; a recipe adds its own before parsing."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=out)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--preset", choices=sorted(presets), default="default")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--recalibrate-batches", type=int, help="re-estimate each exported route's "
                   "BN statistics on this many training batches (rs.recalibrate)")
    p.add_argument("--reconstruct", action="store_true", default=None,
                   help="with --recalibrate-batches: first re-fit each route's layers whose "
                   "inputs were cut to the full model on those batches (rs.reconstruct)")
    return p


def chosen_preset(presets: Mapping[str, Any], args: argparse.Namespace) -> Any:
    """The preset ``--quick`` / ``--preset`` name, with ``--seeds/--methods/--epochs/--threads``
    applied to its ``run`` config."""
    cfg = presets["quick" if args.quick else args.preset]
    run = cfg.run
    for key in ("seeds", "methods", "epochs", "threads", "recalibrate_batches", "reconstruct"):
        v = getattr(args, key, None)
        if v is not None:
            run = replace(run, **{key: tuple(v) if isinstance(v, list) else v})
    return replace(cfg, run=run)
