"""Fuzz routesurgeon with N random multi-output conv nets (seeds start..start+N-1).

Each net (``tests/netgen.py``) is instrumented, trained a few DR-MGF steps (``drmgf-step``, or
the per-epoch ``drmgf`` with ``cycle_steps=2``), and its routes exported at keep 1.0 / 0.5 / 0.25
with learned and magnitude scores; every route is checked against the model (unpruned, to the
bit), against its masked reference (pruned, 1e-5 relative) and for being smaller when pruned.

Run: ``python benchmarks/fuzz.py --examples 1000 [--start 0] [--failures failures.json]``.
The last line reads ``N correct, N refused, N wrong``; the exit status is 1 if any net is wrong.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import netgen


def _kind(reason: str) -> str:
    """A refusal reason without the node it names (``grouped convolution``, ``reshape ...``)."""
    for cut in (":", " (", " call_module", " call_function", " call_method"):
        reason = reason.split(cut)[0]
    return reason


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100, help="number of generated nets")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--failures", type=Path, default=None,
                   help="write the specs of wrong nets (with details) to this JSON file")
    p.add_argument("--every", type=int, default=25, help="progress line every N nets")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    wrong: list[dict[str, object]] = []
    t0 = time.perf_counter()
    for i, seed in enumerate(range(args.start, args.start + args.examples), 1):
        spec = netgen.spec_from_seed(seed)
        out = netgen.check_spec(spec)
        counts[out.status] += 1
        for r in set(out.refusals):
            reasons[_kind(r)] += 1
        if out.status == "wrong":
            wrong.append({"seed": seed, "spec": spec, "detail": out.detail})
            print(f"WRONG seed {seed}: {out.detail.splitlines()[0]}", flush=True)
        if i % args.every == 0 or i == args.examples:
            rate = (time.perf_counter() - t0) / i
            print(f"[{i}/{args.examples}] {counts['correct']} correct, {counts['refused']} "
                  f"refused, {counts['wrong']} wrong ({rate:.2f} s/net)", flush=True)
    if reasons:
        print("refusal reasons (nets):")
        for r, n in reasons.most_common():
            print(f"  {n:5d}  {r}")
    if args.failures is not None:
        args.failures.write_text(json.dumps(wrong, indent=1))
    print(f"{counts['correct']} correct, {counts['refused']} refused, {counts['wrong']} wrong")
    return 1 if counts["wrong"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
