"""The route-quality study's tables (``benchmarks/route_quality.py --summarise``): per recipe the
route / full metric per stage and variant, per task, and paired over seeds against the default
criterion (the decision of docs/results.md)."""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats


def load(paths: Sequence[Path]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def _ms(v: Sequence[float]) -> str:
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"


def relative(r: dict[str, Any], stage: str) -> float:
    """The route's metric over the full model's (for a lower-is-better metric: full / route)."""
    m = r["metric"]
    full, got = r["full"][m], r[stage][m]
    lower = m.split("/", 1)[1] in ("mse", "abs_err", "angle_deg")
    return full / got if lower else got / full


#: a row's stages, in order, with their column titles
STAGES = {"exported": "exported", "recalibrated": "recalibrated",
          "reconstructed": "reconstructed (lsq + BN)", "finetuned": "fine-tuned",
          "reconstructed_finetuned": "reconstructed, fine-tuned"}


def table(rows: list[dict[str, Any]]) -> str:
    """Per recipe and budget: per variant, the mean over tasks of route/full metric per stage
    (mean ± std over seeds), and the actual kept FLOPs fraction."""
    lines = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rr = [r for r in rows if r["recipe"] == recipe]
        seeds = sorted({r["seed"] for r in rr})
        tasks = list(dict.fromkeys(r["task"] for r in rr))
        stages = [st for st in STAGES if any(st in r for r in rr)]
        lines += [f"#### {recipe}: route metric / full model metric, mean over tasks {tasks} "
                  f"(mean ± std over seeds {seeds})", "",
                  "| budget | variant | kept FLOPs | " + " | ".join(STAGES[st] for st in stages)
                  + " |", "|---|---|---|" + "---|" * len(stages)]
        for b in sorted({r["budget"] for r in rr}):
            variants = list(dict.fromkeys(r["variant"] for r in rr if r["budget"] == b))
            scored = []
            for v in variants:
                cells = []
                for stage in stages:
                    per_seed = []
                    for s in seeds:
                        sel = [r for r in rr if r["budget"] == b and r["variant"] == v
                               and r["seed"] == s and stage in r]
                        if len(sel) == len(tasks):
                            per_seed.append(statistics.mean(relative(r, stage) for r in sel))
                    cells.append(per_seed)
                frac = [r["flops_fraction"] for r in rr if r["budget"] == b and r["variant"] == v]
                scored.append((v, statistics.mean(frac), cells))
            ft = stages.index("finetuned") if "finetuned" in stages else -1
            key = ft if ft >= 0 and all(c[ft] for _, _, c in scored) else 1
            for v, frac, cells in sorted(scored, key=lambda x: -statistics.mean(x[2][key] or [0])):
                lines.append(f"| {b} | {v} | {frac:.3f} | " + " | ".join(_ms(c) for c in cells)
                             + " |")
        lines.append("")
    return "\n".join(lines)


def task_table(rows: list[dict[str, Any]], budget: float = 0.5) -> str:
    """Per recipe at ``budget``: per variant and task, route/full metric recalibrated and
    fine-tuned (mean ± std over seeds)."""
    lines = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rr = [r for r in rows if r["recipe"] == recipe and r["budget"] == budget]
        tasks = list(dict.fromkeys(r["task"] for r in rr))
        if not rr:
            continue
        stages = [st for st in ("recalibrated", "reconstructed", "finetuned",
                                "reconstructed_finetuned") if any(st in r for r in rr)]
        lines += [f"#### {recipe} at {budget} of the FLOPs: per task, route/full metric "
                  f"{' / '.join(STAGES[st] for st in stages)} (mean ± std over seeds)", "",
                  "| variant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for v in dict.fromkeys(r["variant"] for r in rr):
            cells = []
            for t in tasks:
                sel = [r for r in rr if r["variant"] == v and r["task"] == t]
                cells.append(" / ".join(_ms([relative(r, st) for r in sel if st in r])
                                        for st in stages))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def per_seed(rows: list[dict[str, Any]], recipe: str, variant: str, stage: str,
             budget: float = 0.5) -> dict[int, float]:
    """Per seed, the mean over tasks of route/full metric (seeds with every task only)."""
    rr = [r for r in rows if r["recipe"] == recipe and r["budget"] == budget and stage in r]
    tasks = {r["task"] for r in rr}
    out = {}
    for s in sorted({r["seed"] for r in rr}):
        sel = [r for r in rr if r["variant"] == variant and r["seed"] == s]
        if sel and {r["task"] for r in sel} == tasks:
            out[s] = statistics.mean(relative(r, stage) for r in sel)
    return out


def paired_table(rows: list[dict[str, Any]], reference: str = "raw-importance",
                 stages: Sequence[str] = ("reconstructed", "reconstructed_finetuned"),
                 budgets: Sequence[float] | None = None) -> str:
    """Per recipe, budget (default: every budget in ``rows``) and stage, every variant against
    ``reference`` paired over the seeds both have: mean difference of route/full metric (mean
    over tasks), its 95 % CI half-width (Student t) and the paired t-test p."""
    lines = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine_b = sorted({float(r["budget"]) for r in rows if r["recipe"] == recipe})
        for budget, stage in itertools.product(mine_b if budgets is None else budgets, stages):
            ref = per_seed(rows, recipe, reference, stage, budget)
            if len(ref) < 2:
                continue
            lines += [f"#### {recipe}, {STAGES[stage]}, at {budget} of the FLOPs: each variant "
                      f"minus `{reference}`, paired over seeds", "",
                      "| variant | seeds | mean | minus " + reference + " | 95 % CI | paired p |",
                      "|---|---|---|---|---|---|"]
            variants = dict.fromkeys(r["variant"] for r in rows if r["recipe"] == recipe)
            found = []
            for v in variants:
                mine = per_seed(rows, recipe, v, stage, budget)
                common = sorted(set(mine) & set(ref))
                if len(common) < 2:
                    continue
                d = np.array([mine[s] - ref[s] for s in common])
                spread = float(d.std(ddof=1))
                if spread > 1e-12:
                    half = float(stats.t.ppf(0.975, len(d) - 1)) * spread / np.sqrt(len(d))
                    p = float(stats.ttest_1samp(d, 0.0).pvalue)  # = the paired t-test
                else:  # the same difference on every seed
                    half, p = 0.0, (0.0 if abs(d.mean()) > 1e-12 else float("nan"))
                found.append((float(np.mean([mine[s] for s in common])), v, len(common),
                              float(d.mean()), half, p))
            for mean, v, n, dm, half, p in sorted(found, reverse=True):
                cell = "–" if v == reference else f"{dm:+.3f}"
                ci = "–" if v == reference else f"± {half:.3f}"
                pp = "–" if v == reference or np.isnan(p) else f"{p:.3f}"
                lines.append(f"| {v} | {n} | {mean:.3f} | {cell} | {ci} | {pp} |")
            lines.append("")
    return "\n".join(lines)
