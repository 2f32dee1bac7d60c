"""Training cost on a GPU: summed-loss step, ``drmgf-step``, ``pcgrad`` and a ``drmgf`` epoch.

A timm resnet50 with T = 3 linear heads at 224 px, batch 64 (the sizes of issue 13), on one
device, every measurement in the same run: per-step methods are timed in interleaved rounds
(median, with ``torch.cuda.synchronize`` around each step), then one ``drmgf`` epoch of
``--epoch-batches`` batches (its T disentanglement passes and the fusion pass: T + 1 passes),
reported per batch of the epoch and relative to the summed-loss step (its floor is T + 1).

Run: ``python benchmarks/gpu_step_bench.py`` (``--device cuda``, the default when a GPU is
present; ``--precision bf16`` for autocast; ``--channels-last``; ``--device cpu --tiny`` for a
seconds-long smoke run of the same code on a resnet10t). ``scripts/gpu_check.sh`` runs it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _common import Heads, sync

import routesurgeon as rs
from routesurgeon.report import device_name

STEP_METHODS = ("equal", "drmgf-step", "pcgrad")


def _timed(f: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    f()
    sync(device)
    return time.perf_counter() - t0


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print its table and return the measurements."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--epoch-batches", type=int, default=10)
    ap.add_argument("--precision", default="32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="resnet10t, batch 2 at 32 px, 1 round, 2-batch epoch (a smoke run)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.arch, args.batch, args.size = "resnet10t", 2, 32
        args.rounds, args.warmup, args.epoch_batches = 1, 1, 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
    y = {f"t{i}": torch.randint(0, 10, (args.batch,), device=device) for i in range(args.tasks)}
    loss_fns = dict.fromkeys(y, F.cross_entropy)

    def trainer(method: str, config: dict[str, Any] | None = None) -> rs.Trainer:
        torch.manual_seed(0)
        model = Heads(args.arch, args.tasks).to(device, memory_format=fmt).train()
        s = rs.instrument(model, x[:2])
        opt = torch.optim.SGD(s.model_parameters(), lr=1e-4, momentum=0.9)
        return rs.Trainer(s, opt, method=method, config=config, precision=args.precision,
                          progress=False)

    t_setup = time.perf_counter()
    trainers = {m: trainer(m) for m in STEP_METHODS}
    steps = {m: (lambda t=t: t.train_step(x, y, loss_fns)) for m, t in trainers.items()}
    for _ in range(args.warmup):
        for f in steps.values():
            f()
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.rounds):
        for m, f in steps.items():
            times[m].append(_timed(f, device))
    step = {m: statistics.median(v) for m, v in times.items()}
    memory = {}
    if device.type == "cuda":
        memory["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    del trainers, steps
    drmgf = trainer("drmgf", {"route_epochs": 1000})  # phase 1: the gated forward
    batches = [(x, y)] * args.epoch_batches
    drmgf.fit_epoch(batches[:1], loss_fns)  # warm-up (one-batch cycle)
    epoch = _timed(lambda: drmgf.fit_epoch(batches, loss_fns), device)
    per_batch = epoch / args.epoch_batches
    total = time.perf_counter() - t_setup
    base = step["equal"]
    skipped = drmgf.skipped + drmgf.overflow_skipped
    print(f"{args.arch}, T={args.tasks}, batch {args.batch}, {args.size} px, "
          f"precision {args.precision}, on {device_name(device)}; median of {args.rounds} "
          f"rounds after {args.warmup} warm-up; all in one run ({total:.0f} s)")
    print(f"  {'method':28s} {'ms':>9s} {'x summed-loss step':>20s}")
    for m in STEP_METHODS:
        label = "summed-loss step (equal)" if m == "equal" else m
        print(f"  {label:28s} {step[m] * 1e3:9.1f} {step[m] / base:20.2f}")
    print(f"  {'drmgf epoch, per batch':28s} {per_batch * 1e3:9.1f} {per_batch / base:20.2f}"
          f"   ({args.epoch_batches} batches, T + 1 = {args.tasks + 1} passes: floor "
          f"{args.tasks + 1}.00; {skipped} steps skipped)")
    if memory:
        print(f"  peak GPU memory of the step methods: {memory['peak_GiB']:.1f} GiB")
    return {"step_s": step, "drmgf_epoch_s": epoch, "drmgf_per_batch_s": per_batch,
            "device": device_name(device), "seconds": total, **memory}


if __name__ == "__main__":
    run()
