"""Route quality: per task, the metric of a route against its kept FLOPs, for every criterion.

One model is trained per (recipe, seed) (``drmgf-step`` by default, the recipes' harness) and
reused by every criterion and budget: train once, score many. For each selection variant (a
criterion of ``routesurgeon.criteria`` with per-layer or global selection, or torch-pruning's
per-task copy) and each FLOPs budget, every task's route is measured as exported, after BN
recalibration (``routesurgeon.recalibrate`` on ``--recal-batches`` training batches) and, at the
``--finetune-budgets``, after the same fine-tuning budget (``--finetune-steps`` Adam steps on the
task loss alone) for every variant. Records are appended to a jsonl file one route at a time, and
a rerun skips what is there (resumable); the trained model of each (recipe, seed) is cached
next to it.

    python benchmarks/route_quality.py --recipe multifashion --seeds 0 1 2 --out runs/rq/r1.jsonl
    python benchmarks/route_quality.py --summarise runs/rq/r1.jsonl runs/rq/r2.jsonl \\
        --md runs/rq/table.md --png docs/route_quality.png
    python benchmarks/route_quality.py --quick --out /tmp/rq.jsonl   # the CI-sized run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import harness as h  # noqa: E402
from route_quality_tables import load, paired_table, table, task_table  # noqa: E402

import routesurgeon as rs  # noqa: E402
from routesurgeon.budgets import cost_model  # noqa: E402
from routesurgeon.criteria import DATA_CRITERIA, criterion_scores  # noqa: E402
from routesurgeon.tp_anchor import TP_STEPS, torch_pruning_routes  # noqa: E402

#: variant name -> (criterion or "tp-<importance>", select)
VARIANTS: dict[str, tuple[str, str]] = {
    "learned": ("learned", "layer"),
    "learned/global": ("learned", "global"),
    "raw-importance": ("raw-importance", "layer"),
    "raw-importance/global": ("raw-importance", "global"),
    "magnitude": ("magnitude", "layer"),
    "group-magnitude": ("group-magnitude", "layer"),
    "group-magnitude/global": ("group-magnitude", "global"),
    "taylor": ("taylor", "layer"),
    "snip": ("snip", "layer"),
    "disparse": ("disparse", "layer"),
    "random": ("random", "layer"),
    "tp-magnitude": ("tp-magnitude", "layer"),
    "tp-taylor": ("tp-taylor", "layer"),
}


@dataclass(frozen=True)
class Study:
    recipe: str = "multifashion"
    seeds: tuple[int, ...] = (0,)
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)
    finetune_budgets: tuple[float, ...] = (0.5,)
    variants: tuple[str, ...] = tuple(VARIANTS)
    method: str = "drmgf-step"
    n_train: int = 2048
    n_test: int = 1000
    epochs: int = 3
    batch_size: int = 32
    max_batches: int | None = None
    recal_batches: int = 16
    score_batches: int = 8
    finetune_steps: int = 32
    finetune_lr: float | None = None  # default: the training lr (1e-3; O-Net 1e-4)
    tp_steps: int = TP_STEPS
    tasks: tuple[str, ...] | None = None  # default: every task of the recipe
    reconstruct: bool = False  # also measure rs.reconstruct (least squares, then BN)


QUICK = Study(n_train=64, n_test=64, epochs=1, max_batches=2, recal_batches=2, score_batches=1,
              finetune_steps=1, budgets=(0.5,), tp_steps=30)


def make_recipe(study: Study) -> h.Recipe:
    if study.recipe in ("multifashion", "multifashion-mbv2"):
        import multifashion as mf

        mbv2 = study.recipe.endswith("mbv2")
        cfg = mf.Config(n_train=study.n_train, n_test=study.n_test,
                        backbone="mobilenetv2" if mbv2 else "resnet18", size=64 if mbv2 else 36)
        return mf.make_recipe(cfg)
    if study.recipe == "multiexit":
        import multiexit as me

        return me.make_recipe(me.Config(n_train=study.n_train, n_test=study.n_test))
    if study.recipe == "onet":
        import onet

        return onet.make_recipe()
    raise SystemExit(f"unknown recipe {study.recipe!r}: multifashion, multifashion-mbv2, "
                     "multiexit or onet")


def run_config(study: Study) -> h.RunConfig:
    lr = 1e-4 if study.recipe == "onet" else 1e-3
    return h.RunConfig(epochs=study.epochs, batch_size=study.batch_size, lr=lr,
                       max_batches=study.max_batches, progress=False, finetune_epochs=1)


def trained_surgeon(recipe: h.Recipe, study: Study, seed: int, cache: Path) -> rs.Surgeon:
    """The seed's model trained once; cached as a state dict beside the results."""
    cfg = run_config(study)
    if cache.exists():
        h.seed_all(seed)
        model, example = recipe.build(seed)
        surgeon = rs.instrument(model, example, tasks=list(recipe.task_names or recipe.tasks))
        surgeon.load_state_dict(torch.load(cache, weights_only=True))
        surgeon.importance_bank.trained = True
        return surgeon.eval()
    surgeon, _, _ = h.train_method(recipe, study.method, seed, cfg)
    torch.save(surgeon.state_dict(), cache)
    return surgeon.eval()


def _primary(recipe: h.Recipe, task: str) -> str:
    return f"{task}/{recipe.tasks[task].metrics[0].name}"


def scores_of(surgeon: rs.Surgeon, crit: str, recipe: h.Recipe, study: Study, seed: int) -> Any:
    """What ``export_routes(scores=...)`` gets for criterion ``crit``: a data criterion computed
    on ``study.score_batches`` training batches of the seed's order, else the name itself."""
    if crit not in DATA_CRITERIA and crit != "random":
        return crit
    loader = h.Batches(recipe.train, study.batch_size, True, seed + 3)
    return criterion_scores(surgeon, crit, loader, h.loss_fns(recipe),
                            batches=study.score_batches, seed=seed)


def refit(route: torch.nn.Module, surgeon: rs.Surgeon, recipe: h.Recipe, study: Study,
          seed: int) -> torch.nn.Module:
    """A re-fitted copy of ``route`` (least squares, then BN) on the seed's calibration batches."""
    return rs.reconstruct(copy.deepcopy(route), surgeon, h.Batches(
        recipe.train, study.batch_size, True, seed + 7), batches=study.recal_batches)


def _stages(route: torch.nn.Module, recipe: h.Recipe, task: str, study: Study, seed: int,
            finetune: bool, surgeon: rs.Surgeon) -> dict[str, dict[str, float]]:
    cfg = run_config(study)
    ft_cfg = replace(cfg, max_batches=study.finetune_steps, lr=study.finetune_lr or cfg.lr)
    test = h.Batches(recipe.test, 256, False)
    out = {"exported": h.evaluate(route, test, recipe, tasks=[task])}
    if study.reconstruct:  # least squares on the same batches, then BN
        fitted = refit(route, surgeon, recipe, study, seed)
        out["reconstructed"] = h.evaluate(fitted, test, recipe, tasks=[task])
        if finetune:  # the same fine-tuning budget, from the reconstructed route
            h.finetune_route(fitted, recipe, task, ft_cfg, seed)
            out["reconstructed_finetuned"] = h.evaluate(fitted, test, recipe, tasks=[task])
    rs.recalibrate(route, h.Batches(recipe.train, study.batch_size, True, seed + 7),
                   batches=study.recal_batches)
    out["recalibrated"] = h.evaluate(route, test, recipe, tasks=[task])
    if finetune:
        h.finetune_route(route, recipe, task, ft_cfg, seed)
        out["finetuned"] = h.evaluate(route, test, recipe, tasks=[task])
    return out


def done_keys(path: Path) -> set[tuple[Any, ...]]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            keys.add((r["recipe"], r["seed"], r["variant"], r["budget"], r["task"]))
    return keys


def run(study: Study, out: Path, log: Callable[[str], None] = print) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = make_recipe(study)
    tasks = list(study.tasks or recipe.tasks)
    done = done_keys(out)
    for seed in study.seeds:
        todo = [(v, b, t) for v in study.variants for b in study.budgets for t in tasks
                if (study.recipe, seed, v, b, t) not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        surgeon = trained_surgeon(recipe, study, seed, out.with_name(
            f"{out.stem}-{study.recipe}-seed{seed}.pt"))
        log(f"[{study.recipe} seed {seed}] model ready in {time.perf_counter() - t0:.0f}s")
        full = h.evaluate(surgeon, h.Batches(recipe.test, 256, False), recipe)
        costs = cost_model(surgeon)
        scores: dict[str, Any] = {}
        tp_cache: dict[tuple[str, str], dict[float, torch.nn.Module]] = {}
        for v, b, t in todo:
            crit, select = VARIANTS[v]
            t1 = time.perf_counter()
            task_full = costs.cost("flops", surgeon.route_masks(t, keep=1.0).pruned, (t,))
            if crit.startswith("tp-"):
                if (crit, t) not in tp_cache:  # one pruning run gives every budget
                    tp_cache[(crit, t)] = torch_pruning_routes(
                        surgeon, t, [bb for vv, bb, tt in todo if vv == v and tt == t],
                        crit[3:], h.Batches(recipe.train, study.batch_size, True, seed + 5),
                        recipe.tasks[t].loss, steps=study.tp_steps)
                route = tp_cache[(crit, t)].pop(b)
                frac = float(route.rs_flops_fraction)
            else:
                if crit not in scores:
                    scores[crit] = scores_of(surgeon, crit, recipe, study, seed)
                exported = surgeon.export_routes(scores=scores[crit], select=select,
                                                 budget_flops=b, tasks=[t])[t]
                frac = costs.cost("flops", exported.meta["routesurgeon"].mask.pruned,
                                  (t,)) / task_full
                route = copy.deepcopy(exported)  # fine-tuning must not touch shared modules
            # torch-pruning's copies too: their kept channels are read off their weights
            stages = _stages(route, recipe, t, study, seed, b in study.finetune_budgets, surgeon)
            rec = {"recipe": study.recipe, "seed": seed, "variant": v, "criterion": crit,
                   "select": select, "budget": b, "task": t, "flops_fraction": frac,
                   "params": sum(p.numel() for p in route.parameters()),
                   "metric": _primary(recipe, t),
                   "full": {k: x for k, x in full.items() if k.startswith(f"{t}/")},
                   **stages, "method": study.method, "wall_s": time.perf_counter() - t1,
                   "study": {k: getattr(study, k) for k in (
                       "n_train", "n_test", "epochs", "batch_size", "max_batches",
                       "recal_batches", "score_batches", "finetune_steps", "finetune_lr")}}
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            m = rec["metric"]
            log(f"[{study.recipe} seed {seed}] {v:24s} b={b} {t:8s} flops {frac:.3f} "
                f"full {full[m]:.3f} exp {stages['exported'][m]:.3f} "
                f"recal {stages['recalibrated'][m]:.3f}"
                + (f" lsq {stages['reconstructed'][m]:.3f}" if "reconstructed" in stages else "")
                + (f" ft {stages['finetuned'][m]:.3f}" if "finetuned" in stages else "")
                + (f" lsq+ft {stages['reconstructed_finetuned'][m]:.3f}"
                   if "reconstructed_finetuned" in stages else "")
                + f" ({rec['wall_s']:.0f}s)")


# -- why a criterion loses ------------------------------------------------------------------------


def _spearman(a: Any, b: Any) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    c = np.corrcoef(ra, rb)[0, 1]
    return float(c) if np.isfinite(c) else 0.0


def diagnose(study: Study, out: Path) -> str:
    """Per cached (recipe, seed) model and task: the median over shared layers of the rank
    correlation between the dominance D_t and the learned |A_t|, and the spread of the layers'
    mean |A_t| (max / min), the scale a global ranking has to bridge."""
    import numpy as np

    from routesurgeon.criteria import raw_importance_table

    recipe = make_recipe(study)
    lines = ["| recipe | seed | task | shared layers | median rank corr. (dominance, abs A_t) | "
             "layer-mean abs A_t, max / min |", "|---|---|---|---|---|---|"]
    for seed in study.seeds:
        cache = out.with_name(f"{out.stem}-{study.recipe}-seed{seed}.pt")
        if not cache.exists():
            continue
        surgeon = trained_surgeon(recipe, study, seed, cache)
        dom, raw = surgeon.route_scores() or {}, raw_importance_table(surgeon)
        for t in surgeon.tasks:
            pairs = [(dom[k][t].numpy(), raw[k][t].numpy()) for k in dom if t in dom[k]]
            rho = [_spearman(d, r) for d, r in pairs]
            means = [float(r.mean()) for _, r in pairs]
            lines.append(f"| {study.recipe} | {seed} | {t} | {len(pairs)} | "
                         f"{np.median(rho):.2f} | {max(means) / min(means):.0f} |")
    return "\n".join(lines) + "\n\n" + movement(study, out)


def _agreement(layers: list[Any], a: Any, b: Any) -> str:
    """Median over layers of the rank correlation of two criteria's group scores, and the mean
    fraction of the top half (what a 0.5 keep per layer keeps) that both keep."""
    import numpy as np

    rho, shared = [], []
    for cand in layers:
        k = max(1, len(cand) // 2)
        top_a = set(cand[np.argsort(-a[cand], kind="stable")[:k]])
        top_b = set(cand[np.argsort(-b[cand], kind="stable")[:k]])
        rho.append(_spearman(a[cand], b[cand]))
        shared.append(len(top_a & top_b) / k)
    return f"{np.median(rho):.2f} / {np.mean(shared):.2f}"


def movement(study: Study, out: Path) -> str:
    """Per cached model and task: how far training moved the learned |A_t| from its
    initialisation (the filter norms of the untrained model), and how the default criterion's
    ranking agrees with magnitude's and Taylor's within each layer (``select="layer"``)."""
    import numpy as np

    from routesurgeon.criteria import raw_importance_table
    from routesurgeon.routes import _selector

    recipe = make_recipe(study)
    lines = ["| recipe | seed | task | median rank corr. abs A_t (trained, init) | median "
             "relative change of abs A_t | raw-importance vs magnitude: median rank corr. in a "
             "layer / top half shared | vs taylor: rank corr. / top half shared |",
             "|---|---|---|---|---|---|---|"]
    for seed in study.seeds:
        cache = out.with_name(f"{out.stem}-{study.recipe}-seed{seed}.pt")
        if not cache.exists():
            continue
        surgeon = trained_surgeon(recipe, study, seed, cache)
        h.seed_all(seed)
        model0, example = recipe.build(seed)  # the same initialisation the training started from
        init = raw_importance_table(rs.instrument(model0, example,
                                                  tasks=list(recipe.task_names or recipe.tasks)))
        raw = raw_importance_table(surgeon)
        loader = h.Batches(recipe.train, study.batch_size, True, seed + 3)
        g = {name: criterion_scores(surgeon, name, loader, h.loss_fns(recipe),
                                    batches=study.score_batches)
             for name in ("raw-importance", "magnitude", "taylor")}
        n = surgeon.channel_groups.n_groups
        for t in surgeon.tasks:
            pairs = [(raw[k][t].numpy(), init[k][t].numpy()) for k in raw if t in raw[k]]
            rho = [_spearman(a, a0) for a, a0 in pairs]
            change = [float(np.linalg.norm(a - a0) / max(np.linalg.norm(a0), 1e-12))
                      for a, a0 in pairs]
            r, m, ty = (g[c].of(t, n) for c in ("raw-importance", "magnitude", "taylor"))
            # each layer's candidate groups, as select="layer" ranks them
            layers = [c for c in _selector(surgeon, t, g["raw-importance"], "layer").layer_cands
                      if len(c) > 1]
            lines.append(f"| {study.recipe} | {seed} | {t} | {np.median(rho):.2f} | "
                         f"{np.median(change):.3f} | {_agreement(layers, r, m)} | "
                         f"{_agreement(layers, r, ty)} |")
    return "\n".join(lines) + "\n"


def curve(rows: list[dict[str, Any]], path: Path, stage: str = "recalibrated") -> Path:
    """PNG: per recipe, route/full metric against kept FLOPs, one line per variant."""
    from routesurgeon.viz.quality import save_quality_curve

    return save_quality_curve(rows, path, stage)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", default="multifashion",
                   choices=["multifashion", "multifashion-mbv2", "multiexit", "onet"])
    p.add_argument("--out", type=Path, default=Path("runs/route_quality/results.jsonl"))
    p.add_argument("--quick", action="store_true", help="the CI-sized run (seconds)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--budgets", type=float, nargs="+")
    p.add_argument("--finetune-budgets", type=float, nargs="+")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--tasks", nargs="+")
    for name in ("n-train", "n-test", "epochs", "recal-batches", "score-batches",
                 "finetune-steps", "tp-steps", "max-batches"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--finetune-lr", type=float,
                   help="Adam lr of the route fine-tune (default: the training lr)")
    p.add_argument("--method")
    p.add_argument("--reconstruct", action="store_true",
                   help="also measure rs.reconstruct (layer least squares, then BN) per route")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summarise", type=Path, nargs="+", help="jsonl files: print the table")
    p.add_argument("--md", type=Path, help="with --summarise: write the table here")
    p.add_argument("--png", type=Path, help="with --summarise: write the curve here")
    p.add_argument("--diagnose", action="store_true", help="dominance against |A| per task, "
                   "from the cached models beside --out")
    return p.parse_args(argv)


def study_of(a: argparse.Namespace) -> Study:
    s = QUICK if a.quick else Study()
    s = replace(s, recipe=a.recipe)
    for key in ("seeds", "budgets", "finetune_budgets", "variants", "tasks"):
        v = getattr(a, key)
        if v is not None:
            s = replace(s, **{key: tuple(v)})
    for key in ("n_train", "n_test", "epochs", "recal_batches", "score_batches",
                "finetune_steps", "finetune_lr", "tp_steps", "max_batches", "method"):
        v = getattr(a, key)
        if v is not None:
            s = replace(s, **{key: v})
    s = replace(s, reconstruct=bool(a.reconstruct))
    if a.quick and a.finetune_budgets is None:
        s = replace(s, finetune_budgets=s.budgets)
    return s


def main(argv: Sequence[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    if a.summarise:
        rows = load(a.summarise)
        text = table(rows) + "\n" + task_table(rows) + "\n" + paired_table(rows)
        print(text)
        if a.md:
            a.md.write_text(text)
        if a.png:
            print(f"curve in {curve(rows, a.png)}")
        return
    if a.diagnose:
        print(diagnose(study_of(a), a.out))
        return
    run(study_of(a), a.out, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
