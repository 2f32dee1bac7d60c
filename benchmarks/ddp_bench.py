"""Data-parallel step time and bytes communicated: routesurgeon's Trainer vs plain DDP.

Runs, side by side on the same global batch (every process uses 1 thread, gloo on CPU):
- ``routesurgeon``: an instrumented model, ``Trainer`` with a process group (1 and 2 processes);
- ``plain DDP``: the uninstrumented model in ``DistributedDataParallel``, summed task losses
  (1 and 2 processes), bytes counted by a DDP communication hook.

    .venv/bin/python benchmarks/ddp_bench.py --spec timm:resnet18 --input-size 64 \
        --global-batch 16 --steps 6 --method drmgf-step
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import routesurgeon as rs
from routesurgeon.distributed import shard


def _data(b: Any, n: int, size: int) -> list[tuple[Any, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    x0 = b.example_inputs if isinstance(b.example_inputs, torch.Tensor) else b.example_inputs[0]
    out = []
    for _ in range(n):
        x = torch.randn(size, *x0.shape[1:], generator=g)
        out.append((x, {t: torch.randint(0, 10, (size,), generator=g) for t in b.tasks}))
    return out


def _worker(rank: int, world: int, kind: str, args: argparse.Namespace, pg: str,
            out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{pg}", rank=rank, world_size=world)
    torch.manual_seed(0)
    b = rs.build_model(args.spec, input_size=args.input_size, num_classes=10)
    batches = [shard(x, rank, world) for x in _data(b, args.steps + 1, args.global_batch)]
    times: list[float] = []
    comm_bytes = 0
    if kind == "routesurgeon":
        s = rs.instrument(b.model.train(), b.example_inputs, tasks=b.tasks)
        tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=1e-3), method=args.method,
                        progress=False)
        losses = dict.fromkeys(s.tasks, F.cross_entropy)
        start = 0
        for i, (x, y) in enumerate(batches):
            t0 = time.perf_counter()
            if i == 1:
                start = tr.comm.bytes
            tr.train_step(x, y, losses)
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
        comm_bytes = (tr.comm.bytes - start) // max(len(times), 1)
    else:
        model = b.model.train()
        counted = [0]
        if world > 1:
            model = DistributedDataParallel(model)

            def hook(state, bucket):  # DDP checks the annotations: leave them out
                counted[0] += bucket.buffer().numel() * bucket.buffer().element_size()
                return allreduce_hook(None, bucket)

            model.register_comm_hook(None, hook)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        start = 0
        for i, (x, y) in enumerate(batches):
            t0 = time.perf_counter()
            if i == 1:
                start = counted[0]
            opt.zero_grad()
            pred = model(x)
            loss = sum(F.cross_entropy(o, y[t]) for t, o in _task_outputs(b, pred).items())
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
        comm_bytes = (counted[0] - start) // max(len(times), 1)
    if rank == 0:
        Path(out).write_text(f"{statistics.median(times)} {comm_bytes}")
    if world > 1:
        dist.destroy_process_group()


def _task_outputs(b: Any, out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, dict):
        return {t: out[t] for t in b.tasks}
    if isinstance(out, (tuple, list)):
        return dict(zip(b.tasks, out))
    return {b.tasks[0]: out}


def _measure(kind: str, world: int, args: argparse.Namespace) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")  # fresh interpreters: fork after autograd is unsafe
        out = str(Path(tmp) / "out")
        procs = [ctx.Process(target=_worker, args=(r, world, kind, args, str(Path(tmp) / "pg"),
                                                   out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"{kind} with {world} processes failed")
        t, n = Path(out).read_text().split()
        return float(t), int(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="timm:resnet18")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--method", default="drmgf-step")
    args = ap.parse_args()
    torch.manual_seed(0)
    b = rs.build_model(args.spec, input_size=args.input_size, num_classes=10)
    s = rs.instrument(b.model.train(), b.example_inputs, tasks=b.tasks)
    n_params = sum(p.numel() for p in s.model_parameters() if p.requires_grad)
    n_shared = sum(p.numel() for p in s.shared_parameters())
    n_imp = sum(p.numel() for p in s.importance_parameters())
    print(f"{args.spec} @ {args.input_size}px, global batch {args.global_batch}, "
          f"{len(s.tasks)} tasks, method {args.method}, {args.steps} timed steps, 1 thread/proc")
    print(f"parameters {n_params:,} (shared {n_shared:,}), importance variables {n_imp:,}")
    rows = []
    for kind in ("plain DDP", "routesurgeon"):
        for world in (1, 2):
            t, n = _measure(kind, world, args)
            rows.append((kind, world, t, n))
    print(f"{'':14} {'procs':>5} {'step ms':>9} {'speed-up':>8} {'bytes/step':>12} "
          f"{'bytes/(4*params)':>16}")
    base = {k: t for k, w, t, _ in rows if w == 1}
    for kind, world, t, n in rows:
        print(f"{kind:14} {world:5d} {1000 * t:9.1f} {base[kind] / t:8.2f} {n:12,d} "
              f"{n / (4 * n_params):16.3f}")
    rs_b = next(n for k, w, _, n in rows if k == "routesurgeon" and w == 2)
    ddp_b = next(n for k, w, _, n in rows if k == "plain DDP" and w == 2)
    print(f"routesurgeon / plain DDP bytes per step: {rs_b / max(ddp_b, 1):.3f}; predicted "
          f"{predicted_floats(args.method, s, n_params, n_shared, n_imp) / n_params:.3f}")


def predicted_floats(method: str, s: rs.Surgeon, n_params: int, n_shared: int,
                     n_imp: int) -> int:
    """Floats all-reduced per step by the Trainer (docs/distributed.md): the T losses, then
    either the fused gradients (+ the Taylor importance of ``drmgf-step``, + FAMO's 2T
    loss-based coefficients) or, for the Jacobian aggregators, T copies of the shared
    parameters' gradients plus the exclusive ones."""
    from routesurgeon.distributed import sync_mode
    from routesurgeon.methods.registry import get_method_class

    t = len(s.tasks)
    cls = get_method_class(method)
    if sync_mode(cls) == "jacobian":
        return t + t * n_shared + (n_params - n_shared)
    extra = {"drmgf-step": n_imp, "famo": 2 * t}.get(method, 0)
    return t + n_params + extra


if __name__ == "__main__":
    main()
