"""Why one criterion's re-fitted, fine-tuned routes trail another's: fine-tune noise, re-fit effort.

``benchmarks/route_quality.py`` fine-tunes each re-fitted route once (24 Adam steps, one data
order). This re-exports the routes of two criteria from the models it cached, re-fits them the
same way (``rs.reconstruct``, 16 batches) and, per route:

- fine-tunes the re-fitted route with ``--repeats`` data orders (seed, seed + 100, ...): the spread
  over orders is the noise of that stage, the mean a steadier estimate of it;
- records how much the least-squares re-fit had to grow the weights of the route's layers
  (``||W re-fitted|| / ||W exported||``, max and median over the route's conv / linear layers):
  the harder the kept channels make it to reproduce the full layer, the larger.

One JSON line per (seed, task, criterion) to stdout; ``--summary`` prints the paired comparison.

    python benchmarks/route_quality_why.py --recipe multiexit --budget 0.25 \
        --cache runs/rq/budgets_r2 > why.jsonl
    python benchmarks/route_quality_why.py --summary why.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import harness as h
import route_quality as rq


def measure(a: argparse.Namespace) -> None:
    study = replace(rq.Study(), recipe=a.recipe, n_train=a.n_train, n_test=a.n_test,
                    epochs=a.epochs, finetune_steps=a.finetune_steps, reconstruct=True,
                    score_batches=a.score_batches)
    recipe = rq.make_recipe(study)
    cfg = rq.run_config(study)
    ft_cfg = replace(cfg, max_batches=study.finetune_steps, lr=a.finetune_lr or cfg.lr)
    test = h.Batches(recipe.test, 256, False)
    for seed in a.seeds:
        cache = Path(f"{a.cache}-{a.recipe}-seed{seed}.pt")
        if not cache.exists():
            raise SystemExit(f"no cached model {cache}: run benchmarks/route_quality.py first")
        surgeon = rq.trained_surgeon(recipe, study, seed, cache)
        scores = {v: rq.scores_of(surgeon, v, recipe, study, seed) for v in a.variants}
        for t in recipe.tasks:
            key = rq._primary(recipe, t)
            full = h.evaluate(surgeon, test, recipe, tasks=[t])[key]
            for v in a.variants:
                route = surgeon.export_routes(scores=scores[v], budget_flops=a.budget, tasks=[t])[t]
                fitted = rq.refit(route, surgeon, recipe, study, seed)
                with torch.no_grad():
                    grow = [float(m.weight.norm() / route.get_submodule(n).weight.norm())
                            for n, m in fitted.named_modules()
                            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
                lsq = h.evaluate(fitted, test, recipe, tasks=[t])[key] / full
                fts = []
                for r in range(a.repeats):
                    f = copy.deepcopy(fitted)
                    h.finetune_route(f, recipe, t, ft_cfg, seed + 100 * r)
                    fts.append(h.evaluate(f, test, recipe, tasks=[t])[key] / full)
                print(json.dumps({"recipe": a.recipe, "budget": a.budget, "seed": seed,
                                  "task": t, "variant": v, "lsq": lsq, "lsq_ft": fts,
                                  "refit_growth_max": max(grow), "refit_growth_median":
                                  float(np.median(grow))}), flush=True)


def summary(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["seed"], r["task"], r["variant"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = ["| criterion | re-fitted | re-fitted, fine-tuned: first order | mean of orders | "
           "spread over orders (median sd) | worst route | re-fit weight growth (median of max) |",
           "|---|---|---|---|---|---|---|"]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        out.append(f"| {v} | {np.mean([r['lsq'] for r in mine]):.3f} | "
                   f"{np.mean([r['lsq_ft'][0] for r in mine]):.3f} | "
                   f"{np.mean([np.mean(r['lsq_ft']) for r in mine]):.3f} | "
                   f"{np.median([np.std(r['lsq_ft'], ddof=1) for r in mine]):.3f} | "
                   f"{min(min(r['lsq_ft']) for r in mine):.3f} | "
                   f"{np.median([r['refit_growth_max'] for r in mine]):.2f} |")
    ref = variants[0]
    for v in variants[1:]:
        for stage in ("lsq", "lsq_ft"):
            def per_seed(var: str, s: int, stage: str = stage) -> float:
                return float(np.mean([np.mean(by[(s, t, var)][stage]) for t in tasks]))
            d = np.array([per_seed(v, s) - per_seed(ref, s) for s in seeds])
            p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 else float("nan")
            what = "re-fitted" if stage == "lsq" else "fine-tuned (mean of orders)"
            each = ", ".join(f"{x:+.3f}" for x in d)
            out.append(f"\n{v} minus {ref}, {what}, per seed: {each}; mean {d.mean():+.3f}, "
                       f"paired p = {p:.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summary", type=Path, help="a JSON-lines file of this script: the table")
    p.add_argument("--recipe", default="multiexit")
    p.add_argument("--cache", default="runs/rq/budgets_r2",
                   help="route_quality.py's --out without .jsonl (the models cached beside it)")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["raw-importance", "group-magnitude"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=24)
    p.add_argument("--finetune-lr", type=float)
    p.add_argument("--score-batches", type=int, default=4)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.summary:
        print(summary(a.summary))
    else:
        measure(a)


if __name__ == "__main__":
    main()
