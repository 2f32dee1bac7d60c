"""Tables of the method study from any set of ``runs.jsonl`` records (``recipes/study.py``).

Per study and budget: every method's test accuracy per task and averaged over tasks, and Δm
against the single-task nets of the same seed, as mean ± the half-width of the 95 % confidence
interval (Student t over seeds); the best baseline (chosen on the *validation* split); a paired
t-test and a Wilcoxon signed-rank test over seeds of each method against it, with the t-test p
Holm-adjusted over every comparison of the table (the family a reader scans); and
time-to-accuracy (CPU seconds and passes until the validation accuracy, measured after every
epoch, first reaches a target), with a PNG of the curves.

Budgets: ``epoch`` (every method ``epochs`` epochs: drmgf has T + 1 passes per epoch, the others
1) and ``matched`` (every method drmgf's passes). A record of a matched run also gives its epoch
budget (its first ``epochs`` epochs are the epoch run).

    python recipes/tables.py study runs/study/runs.jsonl [more.jsonl ...] [--png curves.png]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from study_records import load_records

__all__ = ["best_baseline", "budget_view", "ci95", "holm", "load", "paired_tests",
           "study_markdown", "time_to_accuracy"]


def is_baseline(method: str) -> bool:
    """Everything but drmgf, drmgf-step (and its options), the single-task nets and the
    members of the tuned-equal sweep other than plain ``equal`` (tuned-equal stands for them)."""
    return not (method == "drmgf" or method.startswith("drmgf-step") or
                method.startswith("single:") or method.startswith("equal:lr="))


def load(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The last record of every (study, method, seed) over ``paths`` (later files win)."""
    return list(load_records(*paths).values())


def ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (t-distribution, n - 1 degrees of
    freedom); the half-width is nan with one value."""
    x = np.asarray(values, float)
    if len(x) < 2:
        return float(x.mean()), math.nan
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired tests of ``a`` against ``b`` (same seeds, same order): mean difference, its 95 %
    CI half-width, the two-sided paired t-test p and the two-sided Wilcoxon signed-rank p (exact
    for small n; nan when every difference is 0)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    mean, half = ci95(d)
    t_p = float(stats.ttest_rel(a, b).pvalue) if len(d) > 1 else math.nan
    w_p = float(stats.wilcoxon(a, b).pvalue) if len(d) > 1 and np.any(d != 0) else math.nan
    return {"diff": mean, "half": half, "t_p": t_p, "wilcoxon_p": w_p, "n": len(d)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (family-wise error; nan stays nan and is not
    counted): the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def _epoch_at(rec: Mapping[str, Any], budget: str, epochs: int, passes: float | None
              ) -> dict[str, Any] | None:
    """The per-epoch entry of ``rec`` at ``budget``; None if the run has not got that far."""
    eps = rec["epochs"]
    if budget == "epoch":
        return eps[epochs - 1] if len(eps) >= epochs else None
    hit = [e for e in eps if passes is not None and e["passes"] >= passes - 1e-9]
    return hit[0] if hit else None


TUNED = "tuned-equal"


def _is_equal_lr(method: str) -> bool:
    """``equal`` or ``equal:lr=X`` (the learning-rate sweep of tuned equal weighting)."""
    return method == "equal" or (method.startswith("equal:lr=") and "," not in method)


def budget_view(records: Sequence[Mapping[str, Any]], study: str, budget: str
                ) -> dict[str, dict[int, dict[str, Any]]]:
    """``{method: {seed: epoch entry}}`` of ``study`` at ``budget`` (``epoch`` or ``matched``).

    With an ``equal:lr=X`` sweep, ``tuned-equal`` is added: per seed, the sweep's run with the
    best mean validation accuracy (test numbers of the run chosen on validation)."""
    recs = [r for r in records if r["study"] == study]
    if not recs:
        return {}
    epochs = int(recs[0]["config"]["epochs"])
    drmgf = [r for r in recs if r["method"] == "drmgf" and len(r["epochs"]) >= epochs]
    passes = drmgf[0]["epochs"][epochs - 1]["passes"] if drmgf else None
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in recs:
        e = _epoch_at(r, budget, epochs, passes)
        if e is not None:
            out.setdefault(r["method"], {})[int(r["seed"])] = e
    sweep = [m for m in out if _is_equal_lr(m)]
    if len(sweep) > 1:
        seeds = set.intersection(*(set(out[m]) for m in sweep))
        out[TUNED] = {s: {**max((out[m][s] for m in sweep),
                                key=lambda e: _mean_acc(e["val"])),
                          "chosen": max(sweep, key=lambda m: _mean_acc(out[m][s]["val"]))}
                      for s in sorted(seeds)}
    return out


def _mean_acc(metrics: Mapping[str, float]) -> float:
    return float(np.mean([v for k, v in metrics.items() if k.endswith("/acc")]))


def _delta_m(metrics: Mapping[str, float], ref: Mapping[str, float]) -> float:
    """Δm in percent (higher-is-better accuracies): mean of -(m - ref) / ref."""
    return float(np.mean([-(metrics[k] - ref[k]) / ref[k] * 100 for k in ref]))


def single_reference(view: Mapping[str, Mapping[int, Mapping[str, Any]]]
                     ) -> dict[int, dict[str, float]]:
    """Per seed, each task's test metric from its single-task net (seeds with every task)."""
    ref: dict[int, dict[str, float]] = {}
    singles = {m: v for m, v in view.items() if m.startswith("single:")}
    for m, per in singles.items():
        task = m.split(":", 1)[1]
        for seed, e in per.items():
            ref.setdefault(seed, {}).update(
                {k: v for k, v in e["test"].items() if k.startswith(f"{task}/")})
    n_tasks = len(singles)
    return {s: r for s, r in ref.items() if n_tasks and len({k.split("/")[0] for k in r})
            == n_tasks}


def best_baseline(view: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str | None:
    """The baseline with the highest mean validation accuracy (averaged over tasks and seeds)."""
    scored = {m: np.mean([_mean_acc(e["val"]) for e in per.values()])
              for m, per in view.items() if is_baseline(m) and per}
    return max(scored, key=lambda m: scored[m]) if scored else None


def time_to_accuracy(records: Sequence[Mapping[str, Any]], study: str, target: float
                     ) -> dict[str, dict[str, float]]:
    """Per method, the mean over seeds of the CPU seconds and passes until the mean validation
    accuracy first reaches ``target`` (seeds that never reach it are counted in ``missed``)."""
    out: dict[str, dict[str, float]] = {}
    for m in sorted({r["method"] for r in records if r["study"] == study}):
        cpu, passes, missed = [], [], 0
        for r in (r for r in records if r["study"] == study and r["method"] == m):
            hit = next((e for e in r["epochs"] if _mean_acc(e["val"]) >= target), None)
            if hit is None:
                missed += 1
            else:
                cpu.append(hit["cpu_s"])
                passes.append(hit["passes"])
        out[m] = {"cpu_s": float(np.mean(cpu)) if cpu else math.nan,
                  "passes": float(np.mean(passes)) if passes else math.nan,
                  "reached": len(cpu), "missed": missed}
    return out


def _fmt(mean: float, half: float, scale: float = 1.0, digits: int = 2) -> str:
    if math.isnan(half):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


def study_markdown(records: Sequence[Mapping[str, Any]], study: str, budget: str) -> str:
    """The results table of one study at one budget (see the module docstring)."""
    view = budget_view(records, study, budget)
    if not view:
        return f"_{study}, {budget} budget: no runs yet._\n"
    ref = single_reference(view)
    best = best_baseline(view)
    tasks = sorted({k for per in view.values() for e in per.values() for k in e["test"]})
    head = ["method", "seeds", *[f"{k} %" for k in tasks], "mean acc %", "Δm % ↓",
            "CPU s / run", "passes", f"vs {best or 'best baseline'}: Δ mean acc (pts)",
            "t-test p", "Holm p", "Wilcoxon p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    t_ps: list[float] = []
    for m, per in view.items():
        seeds = sorted(per)
        accs = [_mean_acc(per[s]["test"]) for s in seeds]
        dms = [_delta_m(per[s]["test"], ref[s]) for s in seeds
               if s in ref and not m.startswith("single:")]
        own = m.split(":", 1)[1] if m.startswith("single:") else None  # a single-task net
        cells = [m, str(len(seeds))]
        cells += [_fmt(*ci95([per[s]["test"][k] for s in seeds if k in per[s]["test"]]), 100)
                  if any(k in per[s]["test"] for s in seeds) and own in (None, k.split("/")[0])
                  else "–" for k in tasks]
        cells.append(_fmt(*ci95(accs), 100) if own is None else "–")
        cells.append(_fmt(*ci95(dms)) if dms else "–")
        cells.append(f"{np.mean([per[s]['cpu_s'] for s in seeds]):.0f}")
        cells.append(f"{np.mean([per[s]['passes'] for s in seeds]):.0f}")
        common = [s for s in seeds if best and s in view[best]]
        same = best == TUNED and _is_equal_lr(m)  # a member of the sweep tuned-equal picks from
        if best and m != best and not m.startswith("single:") and not same and len(common) >= 2:
            p = paired_tests([_mean_acc(per[s]["test"]) for s in common],
                             [_mean_acc(view[best][s]["test"]) for s in common])
            cells += [_fmt(p["diff"], p["half"], 100), f"{p['t_p']:.3f}", "",
                      f"{p['wilcoxon_p']:.3f}" if not math.isnan(p["wilcoxon_p"]) else "–"]
            t_ps.append(p["t_p"])
        else:
            cells += ["–", "–", "–", "–"]
            t_ps.append(math.nan)
        rows.append((own is not None, -float(np.mean(accs)) if own is None else 0.0, cells))
    for (_, _, cells), adj in zip(rows, holm(t_ps)):
        if not math.isnan(adj):
            cells[-2] = f"{adj:.3f}"
    for _, _, cells in sorted(rows, key=lambda r: (not r[0], r[1])):
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tta_markdown(records: Sequence[Mapping[str, Any]], study: str, target: float) -> str:
    tta = time_to_accuracy(records, study, target)
    lines = [f"Time to {100 * target:.1f} % mean validation accuracy (CPU s and passes, mean over "
             f"the seeds that reach it):", "", "| method | CPU s | passes | seeds reaching it |",
             "|---|---|---|---|"]
    for m, v in sorted(tta.items(), key=lambda kv: (math.isnan(kv[1]["cpu_s"]), kv[1]["cpu_s"])):
        if m.startswith("single:"):
            continue
        cpu = "–" if math.isnan(v["cpu_s"]) else f"{v['cpu_s']:.0f}"
        ps = "–" if math.isnan(v["passes"]) else f"{v['passes']:.1f}"
        lines.append(f"| {m} | {cpu} | {ps} | {v['reached']}/{v['reached'] + v['missed']} |")
    return "\n".join(lines) + "\n"


def curves_png(records: Sequence[Mapping[str, Any]], study: str, path: Path) -> Path:
    """Mean validation accuracy (over tasks, then seeds) against mean CPU seconds, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in sorted({r["method"] for r in records if r["study"] == study}):
        if m.startswith("single:"):
            continue
        runs = [r for r in records if r["study"] == study and r["method"] == m]
        n = min(len(r["epochs"]) for r in runs)
        x = [np.mean([r["epochs"][i]["cpu_s"] for r in runs]) for i in range(n)]
        y = [100 * np.mean([_mean_acc(r["epochs"][i]["val"]) for r in runs]) for i in range(n)]
        style = "-" if not is_baseline(m) else "--"
        ax.plot(x, y, style, marker=".", label=f"{m} ({len(runs)} seeds)")
    ax.set_xlabel("CPU seconds of training (one thread)")
    ax.set_ylabel("mean validation accuracy over tasks, %")
    ax.set_title(f"{study}: time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", type=Path, nargs="+")
    p.add_argument("--png", type=Path, help="time-to-accuracy curves (one PNG per study)")
    p.add_argument("--target", type=float, help="time-to-accuracy target (default: equal's "
                   "mean validation accuracy at the epoch budget, minus 1 point)")
    a = p.parse_args(argv)
    records = load(a.jsonl)
    text = []
    for study in sorted({r["study"] for r in records}):
        text.append(f"### {study}\n")
        for budget in ("epoch", "matched"):
            text.append(f"#### {budget} budget\n\n" + study_markdown(records, study, budget))
        eq = budget_view(records, study, "epoch").get("equal", {})
        target = a.target or (np.mean([_mean_acc(e["val"]) for e in eq.values()]) - 0.01
                              if eq else None)
        if target:
            text.append(tta_markdown(records, study, float(target)))
        if a.png:
            png = a.png.with_name(f"{a.png.stem}-{study}{a.png.suffix}")
            curves_png(records, study, png)
            text.append(f"![time to accuracy]({png.name})\n")
    out = "\n".join(text)
    print(out)
    return out
