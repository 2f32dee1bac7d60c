"""``make demo``: short recipe 4 (O-Net surgery) and recipe 1 (MultiFashion), end to end.

Writes into ``--out`` (a new numbered directory if it already holds files; nothing is
overwritten): ``index.html`` linking both HTML reports, ``onet/`` and ``multifashion/`` with
``report.html``, ``topology.png``, ``importance.png``, ``results.md`` and ``results.json``.

    python recipes/demo.py --out runs/demo
"""

from __future__ import annotations

import argparse
import html
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h
import multifashion
import onet

DEMO_METHODS = ("equal", "pcgrad", "drmgf-step", "drmgf")

ONET = onet.Config(keeps=(0.5, 0.25), route_export_methods=("drmgf-step", "equal"),
                   run=h.RunConfig(epochs=3, batch_size=20, lr=1e-4, route_methods=(),
                                   finetune_epochs=2, methods=DEMO_METHODS,
                                   report_method="drmgf-step"))
MULTIFASHION = multifashion.Config(
    n_train=1024, n_test=300,
    # pcgrad's per-task Jacobian over resnet18's 11M shared parameters is the slowest step here;
    # it is compared on the O-Net above and in the full recipe
    run=h.RunConfig(epochs=2, batch_size=32, methods=("equal", "drmgf-step", "drmgf"),
                    route_methods=("drmgf-step",),
                    finetune_epochs=1, recalibrate_batches=16, reconstruct=True))


def index_page(out: Path, parts: dict[str, Path], seconds: float) -> Path:
    items = "".join(
        f'<li><a href="{html.escape(str(p.relative_to(out)))}/report.html">{html.escape(name)}'
        f'</a> — <a href="{html.escape(str(p.relative_to(out)))}/results.md">results.md</a></li>'
        for name, p in parts.items())
    page = (f"<!doctype html><meta charset='utf-8'><title>routesurgeon demo</title>"
            f"<h1>routesurgeon demo</h1><p>Finished in {seconds:.0f} s (torch "
            f"{html.escape(torch.__version__)}, {torch.get_num_threads()} threads).</p>"
            f"<ul>{items}</ul>")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--threads", type=int, default=max(1, min(2, torch.get_num_threads())))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    out = h.fresh_dir(a.out)
    t0 = time.perf_counter()
    progress = not a.no_progress
    o_cfg = replace(ONET, run=replace(ONET.run, threads=a.threads, progress=progress))
    m_cfg = replace(MULTIFASHION, run=replace(MULTIFASHION.run, threads=a.threads,
                                              progress=progress))
    parts = {"Recipe 4: O-Net face/no-face surgery": out / "onet",
             "Recipe 1: MultiFashion, resnet18": out / "multifashion"}
    print("== recipe 4 (short): O-Net surgery on lfw_subset ==")
    parts_dirs = list(parts.values())
    parts_dirs[0].mkdir()
    onet.run(o_cfg, parts_dirs[0])
    print((parts_dirs[0] / "results.md").read_text())
    print((parts_dirs[0] / "routes.md").read_text())
    print("== recipe 1 (short): MultiFashion on resnet18 ==")
    parts_dirs[1].mkdir()
    h.run_recipe(multifashion.make_recipe(m_cfg), m_cfg.run, parts_dirs[1])
    print((parts_dirs[1] / "results.md").read_text())
    index = index_page(out, parts, time.perf_counter() - t0)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; open {index}")
    return out


if __name__ == "__main__":
    main()
