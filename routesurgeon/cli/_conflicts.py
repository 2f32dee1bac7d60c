"""``routesurgeon conflicts``: where a model's tasks fight, before any training.

Per shared layer and task pair, the cosine similarity and norm ratio of the task gradients
(``routesurgeon.conflicts``) on ``--data``: ``synthetic`` (random inputs shaped like the example
input and random targets shaped like each output: class indices for outputs with 2+ channels,
scored by cross-entropy, normal values for single-channel ones, scored by mean squared error) or a
file written by ``torch.save`` holding a list of ``(inputs, {task: target})`` batches (then
``--loss`` names the loss per task).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from routesurgeon.cli._loading import _load, _model_args, _positive_int
from routesurgeon.cli._output import EXIT_OK, _line, _status
from routesurgeon.errors import InputError

LOSSES: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "ce": F.cross_entropy,
    "mse": lambda o, y: F.mse_loss(o.reshape(y.shape).float(), y.float()),
    "bce": lambda o, y: F.binary_cross_entropy_with_logits(o.reshape(y.shape), y.float()),
}


def _kind(out: torch.Tensor) -> str:
    return "ce" if out.dim() >= 2 and out.shape[1] >= 2 else "mse"


def _target(out: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "ce":
        shape = (out.shape[0], *out.shape[2:])
        return torch.randint(0, out.shape[1], shape, generator=g)
    return torch.randn(out.shape, generator=g)


def _synthetic(surgeon: Any, example: Any, batches: int, size: int, seed: int
               ) -> tuple[list[Any], dict[str, str]]:
    if isinstance(example, Mapping):
        raise InputError("--data synthetic needs a model with positional tensor inputs; save "
                         "batches with torch.save and pass --data FILE")
    xs = [example] if isinstance(example, torch.Tensor) else list(example)
    if not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in xs):
        raise InputError("--data synthetic makes floating-point tensor inputs only; save batches "
                         "with torch.save and pass --data FILE")
    g = torch.Generator().manual_seed(seed)
    data = []
    kinds: dict[str, str] = {}
    for _ in range(batches):
        inputs = tuple(torch.randn((size, *x.shape[1:]), generator=g, dtype=x.dtype) for x in xs)
        with torch.no_grad():
            outs = _task_outputs(surgeon, surgeon.task_forward(*inputs))
        kinds = kinds or {t: _kind(o) for t, o in outs.items()}
        data.append((inputs, {t: _target(o, kinds[t], g) for t, o in outs.items()}))
    return data, kinds


def _task_outputs(surgeon: Any, out: Any) -> dict[str, torch.Tensor]:
    from routesurgeon.outputs import leaf_values

    spec = surgeon.outputs
    values = leaf_values(out, spec.task_outputs)
    return {t: values[o] for t, o in zip(spec.tasks, spec.task_outputs)}


def _loaded_batches(path: str) -> list[Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--data {path!r}: no such file; use 'synthetic' or a torch.save file "
                         f"of [(inputs, {{task: target}}), ...]")
    data = torch.load(p, weights_only=True)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Mapping):
        data = [data]
    if not isinstance(data, list) or not all(
            isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], Mapping)
            for b in data):
        raise InputError(f"--data {path!r} must hold a list of (inputs, {{task: target}}) "
                         f"batches")
    return data


def _loss_arg(text: str | None, tasks: list[str], default: Mapping[str, str]) -> dict[str, str]:
    kinds = dict(default)
    for item in (text or "").split(","):
        if not item.strip():
            continue
        task, sep, kind = item.partition("=")
        if not sep:  # one loss for every task
            task, kind = "*", item
        if kind not in LOSSES:
            raise InputError(f"--loss {kind!r}: losses are {sorted(LOSSES)}")
        if task != "*" and task not in tasks:
            raise InputError(f"--loss names task {task!r}; tasks are {tasks}")
        for t in tasks if task == "*" else [task]:
            kinds[t] = kind
    missing = [t for t in tasks if t not in kinds]
    if missing:
        raise InputError(f"no loss for tasks {missing}: pass --loss ce|mse|bce or "
                         f"--loss task=ce,...")
    return kinds


def _table(data: dict[str, Any]) -> Table:
    pairs = data["pairs"]
    table = Table(title=f"{data['model']}: task-gradient cosine per shared layer",
                  caption="< 0 (red): the two tasks pull the layer apart")
    table.add_column("layer", style="bold", no_wrap=True)
    for p in pairs:
        table.add_column(p.replace("|", " vs "), justify="right")
    for layer, row in zip(data["layers"], data["cosine"]):
        cells = ["—" if v is None else (f"[red]{v:+.3f}[/red]" if v < 0 else f"{v:+.3f}")
                 for v in row]
        table.add_row(layer, *cells)
    return table


def _cmd_conflicts(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.json and args.json != "-" and Path(args.json).exists() and not args.overwrite:
        raise InputError(f"{args.json} exists; pass --overwrite to replace it")
    loaded = _load(args, err)
    s = loaded.surgeon
    torch.manual_seed(args.seed)
    if args.data == "synthetic":
        example = tuple(s.example_inputs())  # what the model was traced on, in order
        batches, kinds = _synthetic(s, example, args.batches, args.batch_size, args.seed)
    else:
        batches, kinds = _loaded_batches(args.data), {}
    kinds = _loss_arg(args.loss, s.tasks, kinds)
    loss_fns = {t: LOSSES[k] for t, k in kinds.items()}
    with _status(err, f"measuring gradient conflicts on {len(batches)} batches"):
        c = s.conflicts(batches, loss_fns, train=not args.eval)
    record = c.as_record()
    data = {"format": "routesurgeon.conflicts/1", "model": loaded.spec, "data": args.data,
            "losses": kinds, "batches": len(batches), "mode": "eval" if args.eval else "train",
            "layers": record["layers"], "pairs": record["pairs"], "cosine": record["cosine"],
            "norm_ratio": record["norm_ratio"], "summary": c.summary()}
    if args.json == "-":
        out.file.write(json.dumps(data, indent=1) + "\n")
        return EXIT_OK
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    out.print(_table(data))
    if any(v is None for row in data["cosine"] for v in row):
        _line(out, "—: undefined, a task's gradient on that layer is zero (e.g. the residual "
                   "branches behind timm's zero-initialised last BatchNorm of each block)")
    for pair, sm in data["summary"].items():
        if sm["mean_cosine"] is None:
            continue
        _line(out, f"{pair.replace('|', ' vs ')}: mean cosine {sm['mean_cosine']:+.3f}, "
                   f"{100 * sm['negative_fraction']:.0f}% of {int(sm['layers'])} shared layers "
                   f"conflicting (lowest {sm['min_cosine']:+.3f})")
    if args.json:
        _line(out, f"wrote {args.json}")
    return EXIT_OK


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], debug: argparse.ArgumentParser
) -> None:
    """The ``conflicts`` subcommand (``debug``: the parent parser adding ``--debug``)."""
    p = sub.add_parser(
        "conflicts",
        parents=[debug],
        help="measure where the tasks' gradients conflict, per shared layer",
        description="Per shared layer and task pair, the cosine similarity and norm ratio of the "
        "task gradients, at the model's current (random) weights, before any training.",
    )
    _model_args(p)
    p.add_argument("--data", default="synthetic", metavar="synthetic|FILE",
                   help="'synthetic' (random inputs and targets shaped like the model's; "
                        "default) or a torch.save file of [(inputs, {task: target}), ...]")
    p.add_argument("--batches", type=_positive_int, default=2, metavar="N",
                   help="synthetic batches (default 2)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                   help="synthetic batch size (default 8)")
    p.add_argument("--loss", default=None, metavar="ce|task=mse,...",
                   help="loss per task: ce, mse or bce (default for synthetic data: ce for "
                        "outputs with 2+ channels, else mse)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    p.add_argument("--eval", action="store_true",
                   help="run the forward in eval mode (default: train mode, as training does; "
                        "BatchNorm statistics are restored afterwards)")
    p.add_argument("--json", metavar="PATH|-", default=None,
                   help="write the figures as JSON to PATH ('-': print only JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(run=_cmd_conflicts)
