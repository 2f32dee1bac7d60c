"""``rs.reconstruct``: time of stopping each capture forward after its layer vs running it whole.

Reconstruction re-fits every layer whose inputs were cut, layer by layer; each layer needs its
input in the route (after the earlier re-fits) and its output in the full model, on every
calibration batch. Each of those forwards now stops right after the layer (the network past it
is not run). This times that side by side with the whole-forward way (the same code with the
early stop switched off), round-robin in one run, checks that both fit identical weights, and
prints the ratio. Measured (2026-12-07, 2 busy cores, one thread): 1.26-1.31x on a resnet18 route
at 64 px; the rest of reconstruct's time is the per-layer Gram products and solves (float64),
which the early stop does not touch.

Run: ``python benchmarks/reconstruct_bench.py [--arch resnet18] [--size 64] [--batches 4]
[--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import time
from unittest import mock

import torch
from _common import Heads

import routesurgeon as rs

rc = importlib.import_module("routesurgeon.reconstruct")  # the package exports the function


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Heads(a.arch, 2).eval()
    surgeon = rs.instrument(model, torch.randn(2, 3, a.size, a.size))
    route = surgeon.export_routes(keep=0.5, scores="magnitude", tasks=["t0"])["t0"]
    data = [torch.randn(a.batch_size, 3, a.size, a.size) for _ in range(a.batches)]
    n_layers = len(rc._targets(route, surgeon, route.meta["routesurgeon"]))

    def fit(early: bool) -> tuple[float, torch.nn.Module]:
        r = copy.deepcopy(route)
        with mock.patch.object(rc, "_called_once", rc._called_once if early else lambda *_: set()):
            t0 = time.perf_counter()
            rs.reconstruct(r, surgeon, data, batches=a.batches, recalibrate_after=False)
            return time.perf_counter() - t0, r

    times: dict[bool, list[float]] = {True: [], False: []}
    fitted: dict[bool, torch.nn.Module] = {}
    for _ in range(a.repeats):
        for early in (False, True):
            t, fitted[early] = fit(early)
            times[early].append(t)
    same = all(torch.equal(x, y) for x, y in zip(fitted[True].state_dict().values(),
                                                 fitted[False].state_dict().values()))
    whole, stop = min(times[False]), min(times[True])
    print(f"{a.arch} {a.size}px, route t0 at keep 0.5, {n_layers} layers re-fitted, "
          f"{a.batches} batches of {a.batch_size}, best of {a.repeats}:")
    print(f"  whole forwards {whole:.2f} s, stopped after the layer {stop:.2f} s: "
          f"{whole / stop:.2f}x faster; identical weights: {same}")
    if not same:
        raise SystemExit("the two ways fitted different weights")
    return whole / stop


if __name__ == "__main__":
    main()
