"""Cost of mixed precision per method, and of drmgf's gated forward under autocast.

Rows, measured side by side in one run (interleaved rounds, median), on a timm resnet18 with T
linear heads (CPU by default):

- ``gated fwd+bwd``: one task's gated forward and backward (what each step of drmgf's
  disentanglement passes runs), in float32 and under bf16 autocast, with the layers gated on
  their activations (``_ActivationGated``, used under autocast since issue 13) and, for
  comparison, through the gated-weight fallback autocast used to force (every shared weight
  gated as ``G * W / ||W||`` and the plain graph run on those copies);
- ``step``: a training step of ``equal``, ``drmgf-step`` and ``pcgrad`` per precision
  (``--precisions``, default ``32,bf16``; ``fp16`` adds a GradScaler), relative to ``equal``
  in float32. Each method trains its own copy of the model.

Run: ``python benchmarks/precision_bench.py`` (``--tiny`` for a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import Heads

import routesurgeon as rs
from routesurgeon import importance as imp

CLOCK = time.perf_counter


def _timed(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    for f in fns.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = CLOCK()
            f()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precisions", default="32,bf16",
                    help="of the step rows; fp16 on a CPU has no fast kernels (tens of x slower)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the process's CPU time (for a loaded machine)")
    ap.add_argument("--tiny", action="store_true", help="resnet10t, 2 images of 32 px, 1 round")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.tiny:
        args.arch, args.batch, args.size, args.rounds = "resnet10t", 2, 32, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Heads(args.arch, args.tasks).train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = {f"t{i}": torch.randint(0, 10, (args.batch,)) for i in range(args.tasks)}
    loss_fns = dict.fromkeys(y, F.cross_entropy)
    s = rs.instrument(model, x[:2])

    def gated(dtype: torch.dtype | None, weight_path: bool) -> Callable[[], None]:
        def run() -> None:
            orig = imp._has_hooks
            if weight_path:  # the fallback autocast used to take
                imp._has_hooks = lambda modules: True
            try:
                s.zero_grad(set_to_none=True)
                ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast(
                    "cpu", enabled=False)
                with ctx, s.route("t0"):
                    out = s(x)
                    loss = sum(F.cross_entropy(out[k], y[k]) for k in out)
                loss.backward()  # type: ignore[union-attr]
            finally:
                imp._has_hooks = orig
        return run

    rows = _timed({
        "gated fwd+bwd fp32 (activation path)": gated(None, False),
        "gated fwd+bwd bf16, gated weights (old)": gated(torch.bfloat16, True),
        "gated fwd+bwd bf16, activation path (new)": gated(torch.bfloat16, False),
    }, args.rounds)
    print(f"{args.arch}, T={args.tasks}, batch {args.batch}, {args.size} px, "
          f"{args.threads} thread(s), CPU, median of {args.rounds} rounds, {args.clock} clock")
    base = rows["gated fwd+bwd fp32 (activation path)"]
    for k, v in rows.items():
        print(f"  {k:46s} {v * 1e3:9.1f} ms  x{v / base:5.2f}")
    old, new = (rows["gated fwd+bwd bf16, gated weights (old)"],
                rows["gated fwd+bwd bf16, activation path (new)"])
    print(f"  bf16 activation path / gated-weight fallback: {new / old:.2f}")

    trainers: dict[str, Any] = {}
    for method in ("equal", "drmgf-step", "pcgrad"):
        for prec in args.precisions.split(","):
            own = rs.instrument(copy.deepcopy(model), x[:2])
            opt = torch.optim.SGD(own.model_parameters(), lr=1e-5)
            trainers[f"{method} {prec}"] = rs.Trainer(own, opt, method=method, precision=prec,
                                                      progress=False)
    steps = _timed({k: (lambda t=t: t.train_step(x, y, loss_fns)) for k, t in trainers.items()},
                   args.rounds)
    base = steps["equal 32"]
    print("  step time relative to equal in float32:")
    for k, v in steps.items():
        print(f"  {k:46s} {v * 1e3:9.1f} ms  x{v / base:5.2f}")


if __name__ == "__main__":
    main()
