"""Compiled vs eager training step, and compiled vs eager exported route, in one run.

Per method (``equal``, ``drmgf-step`` by default), trainers start from the same weights: one
eager, one with ``Trainer(compile=...)`` and, in the default mode, one with inductor's
``layout_optimization`` (channels-last convs) the other way (the Trainer turns it off on a CPU,
where it measured slower; on a GPU inductor's default, on, is kept). The
compile time (first step) is reported separately; then all train the same batches in
interleaved rounds (median step time), and the largest difference of their parameters from the
eager one's after the run is printed next to the ratio compiled / eager. Last, a route exported
from the model is timed eager and under ``torch.compile(route, fullgraph=True)`` (forward only,
eval mode).

Run: ``python benchmarks/compile_bench.py`` (CPU, timm resnet18 with 3 linear heads, batch 16,
64 px, one thread; ``--clock cpu`` on a loaded machine; ``--device cuda`` on a GPU; ``--tiny``
for a short smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import Heads, sync

import routesurgeon as rs

CLOCK = time.perf_counter


def _median_times(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device
                  ) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            sync(device)
            t0 = CLOCK()
            f()
            sync(device)
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--methods", default="equal,drmgf-step")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="default")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the process's CPU time (for a loaded machine; CPU device only)")
    ap.add_argument("--tiny", action="store_true", help="resnet10t, 2 images of 32 px, 2 rounds")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.device != "cpu":
            ap.error("--clock cpu times CPU work only; use --clock wall on a GPU")
        CLOCK = time.process_time
    if args.tiny:
        args.arch, args.batch, args.size, args.rounds = "resnet10t", 2, 32, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = {f"t{i}": torch.randint(0, 10, (args.batch,), device=device) for i in range(args.tasks)}
    loss_fns = dict.fromkeys(y, F.cross_entropy)
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})"
                                if device.type == "cuda" else f", {args.threads} thread(s)")
    print(f"{args.arch}, T={args.tasks}, batch {args.batch}, {args.size} px, {where}, "
          f"torch.compile mode={args.mode!r}, median of {args.rounds} rounds, {args.clock} clock")
    for method in args.methods.split(","):
        trainers, surgeons = {}, {}
        kinds: dict[str, Any] = {"eager": False, "compiled": args.mode}
        if args.mode == "default":  # inductor's channels-last convs (off by default on a CPU)
            on = device.type != "cpu"
            kinds[f"compiled, layout_optimization {'off' if on else 'on'}"] = {
                "options": {"layout_optimization": not on}}
        for kind, comp in kinds.items():
            torch.manual_seed(0)
            model = Heads(args.arch, args.tasks).to(device).train()
            s = rs.instrument(model, x[:2])
            opt = torch.optim.SGD(s.model_parameters(), lr=1e-3)
            trainers[kind] = rs.Trainer(s, opt, method=method, progress=False, compile=comp)
            surgeons[kind] = s
        steps = {k: (lambda t=t: t.train_step(x, y, loss_fns)) for k, t in trainers.items()}
        first = _median_times(steps, 1, device)  # compiles
        times = _median_times(steps, args.rounds, device)
        print(f"  {method}: eager step {times['eager'] * 1e3:.1f} ms")
        for kind in list(kinds)[1:]:
            diff = max(float((a - b).abs().max()) for a, b in zip(
                surgeons["eager"].model.parameters(), surgeons[kind].model.parameters()))
            print(f"    {kind:36s} {times[kind] * 1e3:8.1f} ms, compiled/eager "
                  f"{times[kind] / times['eager']:5.2f} (first step {first[kind]:.1f} s with "
                  f"the compile); max |param diff| after {args.rounds + 1} steps: {diff:.1e}")
    s = surgeons["eager"]
    s.eval()
    route = s.export_routes(keep=0.5, scores="magnitude", tasks=["t0"])["t0"]
    compiled = torch.compile(route, fullgraph=True)
    with torch.no_grad():
        fwd = {"eager": lambda: route(x), "compiled": lambda: compiled(x)}
        first = _median_times(fwd, 1, device)
        times = _median_times(fwd, args.rounds, device)
        diff = float((route(x) - compiled(x)).abs().max())
    print(f"  route t0 (keep 0.5) forward: eager {times['eager'] * 1e3:8.1f} ms, compiled "
          f"(fullgraph) {times['compiled'] * 1e3:8.1f} ms, compiled/eager "
          f"{times['compiled'] / times['eager']:5.2f} (first {first['compiled']:.1f} s); "
          f"max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
