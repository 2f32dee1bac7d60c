"""The recipes' result tables: mean ± std per method, delta_m against the single-task runs, mean
rank, and the exported routes' sizes and metrics, as markdown."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from harness_metrics import delta_m


def _ms(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def summarise(hib: Mapping[str, bool], runs: list[dict[str, Any]],
              singles: list[dict[str, Any]], delta_keys: Sequence[str] | None = None
              ) -> dict[str, Any]:
    """Mean/std per method and metric (``hib``: metric -> higher is better), delta_m per seed
    against that seed's single-task runs, mean rank over metrics (1 = best)."""
    keys = list(hib)
    dkeys = list(delta_keys or keys)
    dhib = {k: hib[k] for k in dkeys}
    ref_by_seed: dict[int, dict[str, float]] = {}
    for s in singles:
        ref_by_seed.setdefault(s["seed"], {}).update(s["metrics"])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    table: dict[str, dict[str, Any]] = {}
    for m in methods:
        rows = [r for r in runs if r["method"] == m]
        entry: dict[str, Any] = {k: [r["metrics"][k] for r in rows] for k in keys}
        entry["wall_s"] = [r["wall_s"] for r in rows]
        entry["passes"] = [r["passes"] for r in rows]
        dms = [delta_m(r["metrics"], ref_by_seed[r["seed"]], dhib) for r in rows
               if set(dkeys) <= set(ref_by_seed.get(r["seed"], {}))]
        entry["delta_m"] = [d for d in dms if d is not None]
        table[m] = entry
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    for k in keys:  # ties share the mean of their ranks
        signed = {m: statistics.mean(table[m][k]) * (-1 if hib[k] else 1) for m in methods}
        for m in methods:
            better = sum(signed[o] < signed[m] for o in methods)
            tied = sum(signed[o] == signed[m] for o in methods)
            ranks[m].append(better + (tied + 1) / 2)
    for m in methods:
        table[m]["mean_rank"] = statistics.mean(ranks[m])
    single = {k: [s["metrics"][k] for s in singles if k in s["metrics"]] for k in keys}
    return {"methods": table, "single_task": single, "keys": keys, "higher_is_better": hib,
            "delta_keys": dkeys}


def markdown(summary: dict[str, Any], title: str) -> str:
    keys = summary["keys"]
    arrows = ["↑" if summary["higher_is_better"][k] else "↓" for k in keys]
    head = ["method", *[f"{k} {a}" for k, a in zip(keys, arrows)], "Δm % ↓", "mean rank",
            "wall s", "passes"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    if any(summary["single_task"].values()):
        lines.append("| single-task | " + " | ".join(
            _ms(summary["single_task"][k]) if summary["single_task"][k] else "–" for k in keys)
            + " | 0 | – | – | – |")
    for m, e in sorted(summary["methods"].items(), key=lambda kv: kv[1]["mean_rank"]):
        dm = _ms(e["delta_m"]) if e["delta_m"] else "–"
        lines.append(f"| {m} | " + " | ".join(_ms(e[k]) for k in keys)
                     + f" | {dm} | {e['mean_rank']:.2f} | {_ms(e['wall_s'])} | "
                     f"{_ms(e['passes'])} |")
    return "\n".join(lines) + "\n"


def routes_markdown(routes: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    rows = [r for per in routes.values() for r in per.values()]
    stages = [(k, title) for k, title in (("metric_recalibrated", "route BN-recalibrated"),
                                          ("metric_reconstructed", "route reconstructed"))
              if any(k in r for r in rows)]
    cols = ["method", "task", "keep", "scores", "params", "FLOPs", "latency ms", "metric full",
            "route", *(title for _, title in stages), "route fine-tuned"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method, per in routes.items():
        for t, r in per.items():
            def fmt(d: Mapping[str, float]) -> str:
                return ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in d.items())

            rec = "".join(f"{fmt(r.get(k, {})) or '–'} | " for k, _ in stages)
            lines.append(
                f"| {method} | {t} | {r['keep']} | {r['scores']} | "
                f"{r['params'] / 1e6:.3f}M / {r['full_params'] / 1e6:.3f}M | "
                f"{r['flops'] / 1e6:.1f}M / {r['full_flops'] / 1e6:.1f}M | "
                f"{r['latency_ms']:.2f} / {r['full_latency_ms']:.2f} | {fmt(r['metric_full'])} | "
                f"{fmt(r['metric_route'])} | {rec}{fmt(r['metric_finetuned'])} |")
    return "\n".join(lines) + "\n"
