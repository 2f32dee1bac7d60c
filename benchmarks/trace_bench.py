"""Trace + analysis time: ``routesurgeon.instrument`` against torch-pruning's dependency graph.

Both tools are timed on the same multi-output models in one run, on the same example input:
routesurgeon's ``instrument`` (fx tracing, in eval mode and again in train mode only when the graph
may differ, the output check against eager, task reach, channel groups, topology and the Surgeon)
and torch-pruning's ``DependencyGraph().build_dependency(model, example_inputs)`` (one
autograd-traced forward and its dependency graph). Each is run ``--repeat`` times after one warm-up;
the best time counts. The table gives the ratio routesurgeon / torch-pruning per model and the
median ratio (below 1: routesurgeon is faster). ``instrument(verify=False)`` is timed as well, the
part comparable to what torch-pruning does (it does not check its graph against the model).

``--clock cpu`` (default) times with the process CPU clock: on a shared machine wall time mostly
measures the other processes; with one torch thread the CPU time is what each tool costs.
``--clock wall`` times wall-clock seconds. The second table splits routesurgeon's time into the
stages of ``Surgeon.timings`` (wall-clock seconds of the best run), says how many fx traces
were needed (2 when the model's code reads ``self.training``) and gives the floor of any
torch.fx-based analysis: the fx trace plus one forward of the traced graph recording shapes
(stages ``trace`` + ``run``), over torch-pruning's wall time. torch-pruning records its graph
from one eager forward's autograd graph, so it has no symbolic trace to pay for.

Run: ``python benchmarks/trace_bench.py [--repeat 3] [--threads 1] [--clock cpu|wall]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import routesurgeon as rs

MODELS: list[tuple[str, dict[str, Any]]] = [
    ("timm:resnet18", {"input_size": 64}),
    ("timm:resnet50", {"features_only": True, "input_size": 64}),
    ("timm:mobilenetv3_large_100", {"features_only": True, "input_size": 64}),
    ("timm:efficientnet_b0", {"input_size": 64}),
    ("timm:convnext_atto", {"input_size": 64}),
    ("timm:regnety_004", {"features_only": True, "input_size": 64}),
    ("timm:densenet121", {"input_size": 64}),
    ("timm:vit_tiny_patch16_224", {"input_size": 64, "img_size": 64}),
    ("smp:Unet:resnet18", {"aux_classes": 4, "input_size": 128}),
    ("smp:FPN:efficientnet-b0", {"aux_classes": 4, "input_size": 128}),
    ("smp:DeepLabV3Plus:resnet18", {"aux_classes": 4, "input_size": 128}),
]


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
STAGES = ("trace", "run", "verify", "analyse", "surgeon")


def best_time(fn: Callable[[], Any], repeat: int, clock: Callable[[], float]) -> tuple[float, Any]:
    """Best time of ``repeat`` runs after one warm-up, and the result of the best run."""
    fn()  # warm-up: imports, allocator, caches
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        out = fn()
        dt = clock() - t0
        if dt < best:
            best, result = dt, out
    return best, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument("--models", nargs="*", help="only these specs (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    import torch_pruning as tp

    rows: list[tuple[str, float, float, float]] = []
    stages: list[tuple[str, dict[str, float], int]] = []
    print(f"torch {torch.__version__}, torch-pruning {tp.__version__}, threads {args.threads}, "
          f"best of {args.repeat}, {args.clock} clock")
    print(f"{'model':42} {'rs (s)':>8} {'rs noverify':>11} {'tp (s)':>8} {'rs/tp':>7} "
          f"{'noverify/tp':>11}")
    for spec, kw in MODELS:
        if args.models and spec not in args.models:
            continue
        torch.manual_seed(0)
        built = rs.build_model(spec, **kw)
        model, x = built.model.eval(), built.example_inputs
        t_rs, s = best_time(lambda m=model, x=x, b=built: rs.instrument(m, x, tasks=b.tasks),
                            args.repeat, clock)
        t_nv, _ = best_time(
            lambda m=model, x=x, b=built: rs.instrument(m, x, tasks=b.tasks, verify=False),
            args.repeat, clock)
        t_tp, _ = best_time(
            lambda m=model, x=x: tp.DependencyGraph().build_dependency(m, example_inputs=x,
                                                                       verbose=False),
            args.repeat, clock)
        t_tp_wall, _ = best_time(
            lambda m=model, x=x: tp.DependencyGraph().build_dependency(m, example_inputs=x,
                                                                       verbose=False),
            args.repeat, time.perf_counter)
        name = spec + (" features_only" if kw.get("features_only") else "")
        rows.append((name, t_rs, t_nv, t_tp))
        stages.append((name, dict(s.timings) | {"tp": t_tp_wall},
                       1 + bool(s.traced.retrace_reason)))
        print(f"{name:42} {t_rs:8.3f} {t_nv:11.3f} {t_tp:8.3f} {t_rs / t_tp:7.2f} "
              f"{t_nv / t_tp:11.2f}", flush=True)
    if not rows:
        print("no model selected")
        return 1
    med = statistics.median(r[1] / r[3] for r in rows)
    med_nv = statistics.median(r[2] / r[3] for r in rows)
    print(f"median ratio routesurgeon/torch-pruning: {med:.2f} (instrument), "
          f"{med_nv:.2f} (instrument verify=False)")
    print()
    print(f"{'routesurgeon stages (wall s)':42} " + " ".join(f"{k:>8}" for k in STAGES)
          + f" {'traces':>7} {'tp':>8} {'floor/tp':>8}")
    floors = []
    for name, t, n in stages:
        floor = (t.get("trace", 0.0) + t.get("run", 0.0)) / t["tp"]
        floors.append(floor)
        print(f"{name:42} " + " ".join(f"{t.get(k, 0.0):8.3f}" for k in STAGES) + f" {n:7d}"
              f" {t['tp']:8.3f} {floor:8.2f}")
    print(f"floor/tp = (fx trace + one recorded forward of the graph) / torch-pruning, both wall "
          f"clock: what tracing with torch.fx costs before any verification or analysis; "
          f"median {statistics.median(floors):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
