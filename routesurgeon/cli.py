"""The ``routesurgeon`` command line: inspect, export and visualise models named like timm/smp do.

``routesurgeon inspect timm:resnet50 --heads 3``, ``routesurgeon inspect smp:Unet:resnet34
--aux-classes 5``, ``routesurgeon export timm:resnet18 --keep 0.5 --out routes/``, ``routesurgeon
viz timm:resnet50 --out report.html``, ``routesurgeon methods``. ``main(argv)`` returns the exit
code: 0 on success, 2 on a usage or model error (one line on stderr; ``--debug`` shows the
traceback), 1 on an unexpected failure.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from routesurgeon.errors import InputError, RouteSurgeonError

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


# -- formatting --------------------------------------------------------------------------------
def _si(n: float, unit: str = "") -> str:
    """``25557032`` -> ``25.56M``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _console(file: Any) -> Console:
    # Not a terminal (pipes, CI, pytest capture): a fixed width so tables are not squeezed.
    tty = bool(getattr(file, "isatty", lambda: False)())
    return Console(file=file, width=None if tty else 120, highlight=False, soft_wrap=False)


def _line(console: Console, text: str) -> None:
    """A plain line (no markup, no wrapping: paths and messages stay whole)."""
    console.file.write(text + "\n")


@contextmanager
def _status(err: Console, message: str) -> Iterator[None]:
    """A spinner on stderr while something long runs (silent when stderr is not a terminal)."""
    with err.status(message, spinner="dots"):
        yield


# -- building and instrumenting ----------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """A built and instrumented model with what it took."""

    spec: str
    surgeon: Any  # routesurgeon.Surgeon (imported lazily: keeps ``--help`` fast)
    build_seconds: float
    input_shapes: list[list[int]]


def _input_size(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"input size must be S or HxW (e.g. 224 or 256x512), got {text!r}"
        ) from None


def _keep(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep takes a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"--keep takes a fraction in (0, 1], got {v}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _formats(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in items if t not in ("pt", "pt2", "onnx")]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"formats are among pt, pt2, onnx; got {text!r}")
    return tuple(dict.fromkeys(("pt", *items)))


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError(f"expected a comma-separated list, got {text!r}")
    return items


def _leaf_modules(model: nn.Module, names: Sequence[str]) -> list[str | type]:
    """Each name is a submodule path of the model (``layer4.0``) or an importable class
    (``timm.layers.SqueezeExcite``)."""
    out: list[str | type] = []
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            pass
        else:
            out.append(name)
            continue
        mod_name, _, cls_name = name.rpartition(".")
        cls = None
        if mod_name:
            try:
                cls = getattr(importlib.import_module(mod_name), cls_name, None)
            except ImportError:
                cls = None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InputError(
                f"--leaf-modules {name!r} is neither a submodule path of "
                f"{type(model).__name__} (e.g. 'layer4.0') nor an importable nn.Module class "
                f"(e.g. 'timm.layers.SqueezeExcite')"
            )
        out.append(cls)
    return out


def _task_arg(built: Any, tasks: list[str] | None) -> Any:
    """Task names for ``instrument``: the zoo's names, or the user's (all or a subset)."""
    if tasks is None or built.tasks is None or not set(tasks) < set(built.tasks):
        return tasks if tasks is not None else built.tasks
    # A subset of the zoo's names: map each to the output it names (zoo names are positional
    # for tuple/list outputs, e.g. features_only stages or smp's (mask, label)).
    from routesurgeon.outputs import output_names
    from routesurgeon.tracing import normalize_inputs

    model = built.model
    args, kwargs = normalize_inputs(built.example_inputs)
    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            out = model(*args, **kwargs)
    finally:
        model.train(was)
    names = [n for n, v in output_names(out) if isinstance(v, torch.Tensor)]
    if len(names) != len(built.tasks):
        return tasks
    return {t: names[built.tasks.index(t)] for t in tasks}


def _spec_hint(spec: str) -> str:
    """'; did you mean timm:resnet50?' for a bare or misspelt timm name, else ''."""
    try:
        import timm
    except ImportError:
        return ""
    if ":" not in spec:
        return f"; did you mean timm:{spec}?" if timm.is_model(spec) else ""
    kind, _, name = spec.partition(":")
    if kind == "timm" and name:
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.8)
        if close:
            return "; did you mean " + " or ".join(f"timm:{c}" for c in close) + "?"
    return ""


def _smp_error(spec: str) -> InputError | None:
    """A short error for an unknown smp architecture or encoder (smp's own lists them all)."""
    kind, _, rest = spec.partition(":")
    if kind != "smp" or rest.count(":") != 1:
        return None
    import segmentation_models_pytorch as smp

    arch, encoder = rest.split(":")
    archs = {k.lower(): c.__name__ for k, c in smp.MODEL_ARCHITECTURES_MAPPING.items()}
    if arch.lower() not in archs:
        return InputError(
            f"smp has no architecture {arch!r}; use one of {', '.join(sorted(archs.values()))}"
        )
    names = smp.encoders.get_encoder_names()
    if encoder in names or encoder.startswith("tu-"):
        return None
    close = difflib.get_close_matches(encoder, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return InputError(
        f"smp has no encoder {encoder!r}; {hint}any timm model works as tu-NAME "
        f"(e.g. smp:{arch}:tu-resnet50); smp's own encoders are listed by "
        f"segmentation_models_pytorch.encoders.get_encoder_names()"
    )


def _load(args: argparse.Namespace, err: Console) -> Loaded:
    import routesurgeon as rs

    t0 = time.perf_counter()
    with _status(err, f"building {args.model}"):
        kwargs: dict[str, Any] = {}
        if args.input_size is not None:
            kwargs["input_size"] = args.input_size
        try:
            built = rs.build_model(
                args.model,
                features_only=args.features_only,
                heads=args.heads,
                aux_classes=args.aux_classes,
                num_classes=args.num_classes,
                **kwargs,
            )
        except InputError as e:
            raise (_smp_error(args.model) or InputError(f"{e}{_spec_hint(args.model)}")) from e
        except ImportError as e:
            if not args.model.startswith(("timm:", "smp:")):
                raise
            raise InputError(
                f"{args.model} needs {e.name or 'a missing package'}: "
                f"pip install 'routesurgeon[models]' (timm, segmentation-models-pytorch)"
            ) from e
    leaves = _leaf_modules(built.model, _split(args.leaf_modules) or [])
    tasks = _task_arg(built, _split(args.tasks))
    with _status(err, f"tracing {args.model}"):
        surgeon = rs.instrument(built.model, built.example_inputs, tasks=tasks, leaf_modules=leaves)
    inputs = built.example_inputs
    tensors = (
        [inputs]
        if isinstance(inputs, torch.Tensor)
        else (list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs))
    )
    shapes = [list(x.shape) for x in tensors if isinstance(x, torch.Tensor)]
    return Loaded(built.spec, surgeon, time.perf_counter() - t0, shapes)


# -- inspect -----------------------------------------------------------------------------------
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


# -- export ------------------------------------------------------------------------------------
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

    if args.scores == "importance" and not args.checkpoint:
        raise InputError(
            "--scores importance needs --checkpoint PATH (a run trained with "
            "drmgf or drmgf-step); a freshly built model has only --scores magnitude"
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
        f"latency: median of {args.latency_repeats} CPU forwards",
    )
    for name, manifest in manifests.items():
        _line(out, f"saved {name}: {manifest.parent}")
    return EXIT_OK


# -- viz ---------------------------------------------------------------------------------------
def _check_file(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise InputError(f"--checkpoint {path!r} is not a file")


def _apply_checkpoint(surgeon: Any, path: str) -> list[dict[str, Any]]:
    """Load a ``Trainer.save_checkpoint`` file's weights and importance; return its history."""
    from routesurgeon import checkpoint as ckpt

    _check_file(path)
    header = ckpt.read_header(path)
    bank = surgeon.importance_bank
    _, payload = ckpt.read_payload(
        path,
        fingerprint=ckpt.fingerprint(surgeon.model, bank),
        tasks=surgeon.tasks,
        method=header.method,
    )
    surgeon.model.load_state_dict(payload["model"])
    bank.load_state_dict(payload["bank"])
    bank.trained = bool(payload["bank_trained"])
    return list(payload["trainer"]["history"])


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


# -- methods -----------------------------------------------------------------------------------
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


# -- parser ------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="timm:NAME (timm:resnet50), smp:ARCH:ENCODER (smp:Unet:resnet34) or "
        "module:package.module:factory",
    )
    p.add_argument(
        "--features-only", action="store_true", help="timm: the feature pyramid, one task per stage"
    )
    p.add_argument(
        "--heads",
        type=int,
        default=3,
        metavar="N",
        help="timm: number of linear heads on the pooled features (default 3)",
    )
    p.add_argument(
        "--aux-classes",
        type=int,
        default=None,
        metavar="N",
        help="smp: add the auxiliary classification head with N classes",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=10,
        metavar="N",
        help="classes per head / segmentation classes (default 10)",
    )
    p.add_argument(
        "--input-size",
        type=_input_size,
        default=None,
        metavar="S",
        help="example input size S or HxW (default: timm's pretrained size, 128 for smp)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        metavar="a,b,c",
        help="task names: a subset of the outputs, or one new name per output",
    )
    p.add_argument(
        "--leaf-modules",
        default=None,
        metavar="mod.Class,...",
        help="submodule paths or importable classes to trace as opaque ops",
    )


def build_parser() -> argparse.ArgumentParser:
    from routesurgeon import __version__

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback on errors",
    )
    parser = argparse.ArgumentParser(
        prog="routesurgeon",
        description="Trace multi-output models, see which filters their tasks share, and export "
        "one pruned route per task.",
    )
    parser.add_argument("--version", action="version", version=f"routesurgeon {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
        choices=["magnitude", "importance"],
        default="magnitude",
        help="channel scores: weight magnitude (default) or learned importance",
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

    p = sub.add_parser(
        "methods",
        parents=[debug],
        help="list the training methods",
        description="List the methods routesurgeon.Trainer accepts.",
    )
    p.add_argument("--json", metavar="-", choices=["-"], help="print them as JSON")
    p.set_defaults(run=_cmd_methods)
    return parser


# -- entry point -------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    """The error as one line: its first line, plus the 'What to do' advice if it has one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    advice = [ln for ln in lines[1:] if ln.lower().startswith("what to do")]
    text = lines[0]
    for more in advice:
        text += (" " if text.endswith((".", ";", ":")) else ". ") + more
    # the library's advice names the Python argument; the CLI's flag is --leaf-modules
    return re.sub(r"leaf_modules=\[([^\]]*)\]", r"--leaf-modules \1", text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage/model error, 1 failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    out, err = _console(sys.stdout), _console(sys.stderr)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.run(args, out, err))
    except (RouteSurgeonError, NotImplementedError, FileExistsError) as e:
        if debug:
            raise
        print(f"routesurgeon {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"routesurgeon {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(
            f"routesurgeon {args.command}: failed: {type(e).__name__}: {_one_line(e)} "
            f"(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
