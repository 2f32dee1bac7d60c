"""What each route costs: parameters, FLOPs and measured latency against the full model.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
products, 2 FLOPs per multiply-add; elementwise ops are not counted). Latency is the median of
``repeats`` timed forward passes under ``torch.no_grad``; the models are timed round-robin (one
pass of each per round) so that load changes on a shared machine hit all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from routesurgeon.errors import InputError

if TYPE_CHECKING:
    from rich.table import Table

    from routesurgeon.surgeon import Surgeon

__all__ = ["count_flops", "count_params", "measure_latency", "render_report", "route_report"]


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, inputs: Sequence[Any]) -> int:
    """FLOPs of one forward pass of ``module`` on ``inputs`` (conv/matmul, 2 per MAC)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs)
    return int(counter.get_total_flops())


def measure_latency(modules: Mapping[str, nn.Module], inputs: Sequence[Any], repeats: int = 10,
                    warmup: int = 2, clock: str = "wall") -> dict[str, float]:
    """Median forward latency in milliseconds of each module, timed round-robin.

    ``clock="wall"`` times with ``time.perf_counter``; ``clock="cpu"`` with ``time.process_time``
    (CPU time of this process, all its threads): on a machine shared with other work it is not
    inflated by waiting for a core, so ratios between modules stay comparable. With inputs on a
    GPU every forward is timed between two ``torch.cuda.synchronize`` (the kernels, not their
    launch); ``clock="cpu"`` is then refused (the GPU's time is not the process's CPU time).
    """
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    if clock not in clocks:
        raise InputError(f"clock must be one of {sorted(clocks)}, got {clock!r}")
    dev = input_device(inputs)
    if dev.type != "cpu" and clock == "cpu":
        raise InputError(f"clock='cpu' cannot time forwards on {dev}; use clock='wall'")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    now = clocks[clock]
    times: dict[str, list[float]] = {name: [] for name in modules}
    with torch.no_grad():
        for _ in range(warmup):
            for m in modules.values():
                m(*inputs)
        for _ in range(repeats):
            for name, m in modules.items():
                sync()
                t0 = now()
                m(*inputs)
                sync()
                times[name].append((now() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def input_device(inputs: Sequence[Any]) -> torch.device:
    """The device of the first tensor in ``inputs`` (CPU when there is none)."""
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """``"cpu"``, or e.g. ``"cuda:0 (NVIDIA H200)"``: what latency numbers were measured on."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def route_report(
    surgeon: Surgeon,
    routes: Mapping[str, nn.Module],
    union: nn.Module | None = None,
    inputs: Sequence[Any] | None = None,
    repeats: int = 10,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """One row per route, the union (if given) and the full multi-output model.

    Each row: ``name``, ``kind`` (``full``/``route``/``union``), ``params``, ``flops``,
    ``latency_ms`` (measured on ``device``, named in each row: ``"cpu"`` or
    ``"cuda:0 (<GPU name>)"``) and the fractions ``params_frac``, ``flops_frac``,
    ``latency_ratio`` of the full model's. The full model is the traced graph of the user's
    model in eval mode (it computes exactly what the model computes; every task's output at
    once).
    """
    if not routes and union is None:
        raise InputError("route_report needs at least one route or a union route")
    xs = list(inputs) if inputs is not None else surgeon.example_inputs()
    full = surgeon.traced.eval_graph
    named: dict[str, tuple[str, nn.Module]] = {"full": ("full", full)}
    for task, route in routes.items():
        if task in ("full", "union"):
            raise InputError(f"a route may not be named {task!r} in a report (reserved row name)")
        named[task] = ("route", route)
    if union is not None:
        named["union"] = ("union", union)
    was_training = {name: m.training for name, (_, m) in named.items()}
    for _, m in named.values():
        m.eval()
    try:
        latency = measure_latency({n: m for n, (_, m) in named.items()}, xs, repeats, warmup)
        flops = {n: count_flops(m, xs) for n, (_, m) in named.items()}
    finally:
        for name, (_, m) in named.items():
            m.train(was_training[name])
    params = {n: count_params(surgeon.model if k == "full" else m) for n, (k, m) in named.items()}
    device = device_name(input_device(xs))
    rows = []
    for name, (kind, _) in named.items():
        rows.append({
            "name": name,
            "kind": kind,
            "params": params[name],
            "flops": flops[name],
            "latency_ms": latency[name],
            "params_frac": params[name] / max(params["full"], 1),
            "flops_frac": flops[name] / max(flops["full"], 1),
            "latency_ratio": latency[name] / latency["full"],
            "device": device,
        })
    return rows


def render_report(rows: Sequence[Mapping[str, Any]], title: str = "routes") -> Table:
    """A ``rich`` table of ``route_report`` rows."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("route", "params", "FLOPs", "latency ms", "params/full", "FLOPs/full",
                "latency/full"):
        table.add_column(col, justify="left" if col == "route" else "right")
    for r in rows:
        table.add_row(
            str(r["name"]), f"{r['params']:,}", f"{r['flops'] / 1e6:,.1f}M",
            f"{r['latency_ms']:.2f}", f"{r['params_frac']:.3f}", f"{r['flops_frac']:.3f}",
            f"{r['latency_ratio']:.3f}",
        )
    return table
