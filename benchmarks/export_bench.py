"""Exported routes: kept-FLOPs fraction vs measured latency ratio, and torch-pruning side by side.

For timm resnet50, efficientnet_b0, convnext_tiny (3 linear heads each) and an smp Unet-resnet34
with an auxiliary classification head, per task route at ``keep`` (default 0.5, magnitude
scores): the route's FLOPs, params and activation elements (every intermediate tensor's size, a
proxy for memory traffic) as fractions of the full multi-output model, and its median
CPU latency as a ratio of the full model's, all timed round-robin in one run. Target: latency
ratio within 1.2x of the FLOPs fraction. The union of all routes is reported too.

torch-pruning side by side: the unpruned route of the same task (``keep=1``, the task's own
subgraph) pruned by ``torch_pruning.pruner.MagnitudePruner`` with ``pruning_ratio = 1 - keep``
(the task's output layer ignored); beside the union, torch-pruning on the original multi-output
model (every output layer ignored). Each pruned model's forward is checked (runs, same output
shapes) and its FLOPs/latency are reported, or why it broke.

Latency is timed at each of ``--batches`` (default 2 and 32): at batch 2 a 160 px
efficientnet_b0 spends a large share of its time in per-op costs that do not shrink with the
channel count (Python dispatch of each graph node, kernel set-up, memory-bound BatchNorm/SiLU/
depthwise passes), so its latency ratio sits well above its FLOPs fraction for any pruner
(torch-pruning's model of the same size shows the same ratio); at batch 32 the arithmetic
dominates.

Run: ``python benchmarks/export_bench.py [--size 160] [--repeats 5] [--fuse-bn]
[--batches 2 32] [--clock cpu] [--models resnet50 ...]``.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from typing import Any

import torch
import torch.fx as fx
from rich.console import Console
from rich.table import Table
from torch import nn

import routesurgeon as rs
from routesurgeon.report import count_flops, count_params, measure_latency

MODELS = {
    "resnet50": ("timm:resnet50", {}),
    "efficientnet_b0": ("timm:efficientnet_b0", {}),
    "convnext_tiny": ("timm:convnext_tiny", {}),
    "unet_resnet34": ("smp:Unet:resnet34", {"aux_classes": 4}),
}


def output_layer_path(route: fx.GraphModule) -> str | None:
    """Module path of the conv/linear that produces the route's output."""
    out = next(n for n in route.graph.nodes if n.op == "output")
    frontier = list(out.all_input_nodes)
    seen: set[fx.Node] = set()
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = route.get_submodule(str(n.target))
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return str(n.target)
        frontier.extend(n.all_input_nodes)
    return None


class _Activations(fx.Interpreter):
    """Counts the elements of every intermediate tensor (a proxy for memory traffic)."""

    total = 0

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op not in ("placeholder", "get_attr", "output") and isinstance(out, torch.Tensor):
            self.total += out.numel()
        return out


def activation_elements(gm: fx.GraphModule, inputs: list[Any]) -> int:
    interp = _Activations(gm)
    with torch.no_grad():
        interp.run(*inputs)
    return interp.total


def tp_prune(route: nn.Module, inputs: list[Any], ratio: float,
             heads: list[str] | None = None) -> tuple[nn.Module | None, str]:
    """``route`` (or a whole model) pruned by torch-pruning, checked to run and keep its output
    shapes; ``heads`` are the output layers' module paths (default: found on the route graph)."""
    import torch_pruning as tp

    model = copy.deepcopy(route).eval()
    with torch.no_grad():
        want = model(*inputs)
    if heads is None:
        assert isinstance(model, fx.GraphModule)
        heads = [p for p in [output_layer_path(model)] if p is not None]
    try:
        pruner = tp.pruner.MagnitudePruner(
            model, inputs[0] if len(inputs) == 1 else tuple(inputs),
            importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=[model.get_submodule(h) for h in heads])
        pruner.step()
    except Exception as e:
        return None, f"pruner failed: {type(e).__name__}: {str(e)[:120]}"
    try:
        with torch.no_grad():
            got = model(*inputs)
    except Exception as e:
        return None, f"broken model: forward fails: {type(e).__name__}: {str(e)[:120]}"
    leaves = torch.utils._pytree.tree_leaves
    got_shapes = [tuple(t.shape) for t in leaves(got)]
    want_shapes = [tuple(t.shape) for t in leaves(want)]
    if got_shapes != want_shapes:
        return None, f"broken model: output shapes {got_shapes} != {want_shapes}"
    return model, "ok"


def fuse_bn(gm: fx.GraphModule, inputs: list[Any]) -> fx.GraphModule:
    """Conv+BatchNorm folded (``torch.fx.experimental.optimization.fuse``), output checked."""
    from torch.fx.experimental.optimization import fuse

    fused = fuse(gm)
    with torch.no_grad():
        got, want = fused(*inputs), gm(*inputs)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
    return fused


def bench(name: str, size: int, keep: float, repeats: int, console: Console,
          fuse: bool = False, batches: tuple[int, ...] = (2,), clock: str = "wall") -> list[dict]:
    spec, kwargs = MODELS[name]
    b = rs.build_model(spec, input_size=size, **kwargs)
    t0 = time.perf_counter()
    s = rs.instrument(b.model, b.example_inputs, tasks=b.tasks)
    t_inst = time.perf_counter() - t0
    t0 = time.perf_counter()
    routes = s.export_routes(keep=keep, scores="magnitude")
    t_export = time.perf_counter() - t0
    union = s.export_routes(keep=keep, scores="magnitude", union=True)
    whole = s.export_routes(keep=1.0, scores="magnitude")
    xs = s.example_inputs()
    timed: dict[str, nn.Module] = {"full": s.traced.eval_graph, "union": union}
    tp_status: dict[str, str] = {}
    for t, r in routes.items():
        timed[t] = r
        pruned, status = tp_prune(whole[t], xs, 1.0 - keep)
        tp_status[t] = status
        if pruned is not None:
            timed[f"tp:{t}"] = pruned
    if fuse:  # the same folding for every model timed, the full one included
        timed = {k: fuse_bn(m, xs) if isinstance(m, fx.GraphModule) else m
                 for k, m in timed.items()}
    # torch-pruning on the original multi-output model (all tasks at once, beside the union)
    heads = [p for p in (output_layer_path(w) for w in whole.values()) if p is not None]
    pruned, tp_status["union"] = tp_prune(b.model, list(b.example_inputs if isinstance(
        b.example_inputs, tuple) else (b.example_inputs,)), 1.0 - keep, heads)
    if pruned is not None:
        timed["tp:union"] = pruned
    lat = {}
    for batch in batches:  # same models, the example inputs' shape at another batch size
        xb = [torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
              if isinstance(x, torch.Tensor) else x for x in xs]
        lat[batch] = measure_latency(timed, xb, repeats=repeats, warmup=1, clock=clock)
    flops = {k: count_flops(m, xs) for k, m in timed.items()}
    params = {k: count_params(m) for k, m in timed.items()}
    params["full"] = count_params(b.model)
    acts = {k: activation_elements(m, xs) for k, m in timed.items()
            if isinstance(m, fx.GraphModule)}
    rows = []
    for t in [*routes, "union"]:
        f_frac = flops[t] / flops["full"]
        row = {"model": name, "route": t, "flops_frac": f_frac, "params_frac":
               params[t] / params["full"], "act_frac": acts[t] / acts["full"],
               "tp": tp_status.get(t, "-"), "latency_ratio": {}, "lat_over_flops": {},
               "tp_latency_ratio": {}}
        for batch, ms in lat.items():
            row["latency_ratio"][batch] = ms[t] / ms["full"]
            row["lat_over_flops"][batch] = ms[t] / ms["full"] / f_frac
            if f"tp:{t}" in ms:
                row["tp_latency_ratio"][batch] = ms[f"tp:{t}"] / ms["full"]
        if f"tp:{t}" in timed:
            row["tp_flops_frac"] = flops[f"tp:{t}"] / flops["full"]
        rows.append(row)
    full_ms = ", ".join(f"batch {b_}: {ms['full']:.1f} ms" for b_, ms in lat.items())
    console.print(f"{name}: {size}px, full model {flops['full'] / 1e9:.2f} GFLOPs at batch "
                  f"{xs[0].shape[0]}, median of {repeats} ({clock} clock) {full_ms}; "
                  f"instrument {t_inst:.2f}s, export {len(routes)} routes {t_export:.2f}s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fuse-bn", action="store_true",
                    help="fold BatchNorm into convs (every model, full included) before timing")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 32],
                    help="batch sizes timed (the FLOPs fraction does not depend on it)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, for a machine shared with other work")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    console = Console(width=260)
    rows = []
    for name in args.models:
        rows += bench(name, args.size, args.keep, args.repeats, console, args.fuse_bn,
                      tuple(args.batches), args.clock)
    table = Table(title=f"routes at keep={args.keep} vs full multi-output model "
                        f"({args.size}px, CPU, {args.threads} thread(s), {args.clock} clock"
                        f"{', BN folded' if args.fuse_bn else ''}); target: latency ratio "
                        f"<= 1.2 x FLOPs fraction")
    for col in ("model", "route", "FLOPs frac", "params frac", "activations frac"):
        table.add_column(col)
    for batch in args.batches:
        for col in ("latency", "lat/FLOPs", "target", "tp latency"):
            table.add_column(f"{col} b{batch}")
    table.add_column("tp FLOPs frac")
    table.add_column("torch-pruning")
    for r in rows:
        cells = [r["model"], r["route"], f"{r['flops_frac']:.3f}", f"{r['params_frac']:.3f}",
                 f"{r['act_frac']:.3f}"]
        for batch in args.batches:
            tp_lat = r["tp_latency_ratio"].get(batch)
            cells += [f"{r['latency_ratio'][batch]:.3f}", f"{r['lat_over_flops'][batch]:.2f}",
                      "ok" if r["lat_over_flops"][batch] <= 1.2 else "MISS",
                      f"{tp_lat:.3f}" if tp_lat is not None else "-"]
        cells += [f"{r['tp_flops_frac']:.3f}" if "tp_flops_frac" in r else "-", r["tp"]]
        table.add_row(*cells)
    console.print(table)
    misses = sorted({(r["model"], b_) for r in rows for b_ in args.batches
                     if r["lat_over_flops"][b_] > 1.2})
    console.print("target met on every route at every batch" if not misses else
                  "target missed: " + ", ".join(f"{m} at batch {b_}" for m, b_ in misses))


if __name__ == "__main__":
    main()
