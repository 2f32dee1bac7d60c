"""CPU cost of one training step of every registered method, relative to ``equal``, on the
study's LeNet-size MultiFashion net (``recipes/lenet.py``: ``MultiLeNet``, 36 px canvases).

    python benchmarks/method_step_cost.py [--batch 256] [--steps 20] [--methods a,b,...]

Process CPU time (``time.process_time``, one thread) of ``--steps`` ``Trainer.train_step`` calls
after two warm-up steps; the table gives ms per step and the ratio to ``equal``. ``drmgf`` (a
per-epoch method) is left out: its cost is per epoch (see ``benchmarks/step_bench.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from lenet import MultiLeNet

import routesurgeon as rs

LOSSES = {"left": F.cross_entropy, "right": F.cross_entropy}


def step_ms(method: str, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = MultiLeNet(size=36)
    s = rs.instrument(model.train(), torch.zeros(2, 1, 36, 36))
    tr = rs.Trainer(s, torch.optim.Adam(s.model_parameters(), lr=1e-3), method=method,
                    progress=False)
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(batch, 1, 36, 36, generator=g),
             {t: torch.randint(0, 10, (batch,), generator=g) for t in LOSSES})
            for _ in range(4)]
    for x, y in data[:2]:
        tr.train_step(x, y, LOSSES)
    t0 = time.process_time()
    for i in range(steps):
        x, y = data[i % len(data)]
        tr.train_step(x, y, LOSSES)
    return (time.process_time() - t0) / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", default=None, help="comma-separated (default: all but drmgf)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = (a.methods.split(",") if a.methods else
               [m for m in rs.available_methods() if m != "drmgf"])
    if "equal" not in methods:
        methods.insert(0, "equal")
    ms = {m: step_ms(m, a.batch, a.steps) for m in methods}
    print(f"| method | ms / step (CPU, batch {a.batch}) | x equal |\n|---|---|---|")
    for m, v in sorted(ms.items(), key=lambda kv: kv[1]):
        print(f"| {m} | {v:.1f} | {v / ms['equal']:.2f} |")


if __name__ == "__main__":
    main()
