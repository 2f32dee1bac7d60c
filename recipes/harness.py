"""The shared harness of the recipes: every method, the same data, seeds, budget and evaluation.

A recipe describes its model builder, data and tasks (``Recipe``); ``run_recipe`` trains every
registered method (``rs.available_methods()``) and a single-task baseline per task with the same
optimiser, epochs and batches, evaluates them, exports per-task routes of the route methods, and
writes ``results.json``, ``results.md`` and the HTML report into the output directory.

Under ``torchrun --nproc_per_node N recipes/X.py ...`` (``WORLD_SIZE`` > 1 in the environment) the
harness initialises the process group (gloo; ``cpu:gloo,cuda:nccl`` when CUDA is available), every
rank trains on its equal share of every global batch (methods through the ``Trainer``, which
detects the group; single-task baselines and route fine-tuning by averaging gradients here),
evaluation shards the test batches and all-reduces the metric sums (the same numbers on every
rank), and only rank 0 writes the output directory, prints and draws progress bars (other ranks
write into a private temporary directory, removed at exit). BatchNorm in train mode normalises with
each rank's share (no SyncBatchNorm on CPU); the header of ``results.md`` says so.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# re-exported: the recipes use them as harness.X
from harness_dist import (
    Sharded,
    _scratch_dir,
    average_buffers,
    average_gradients,
    distributed_header,
    distributed_info,
    init_distributed,
    replicate,
)
from harness_metrics import Metric, abs_err, accuracy, angle_err, delta_m, miou, mse, pixel_acc  # noqa: F401
from harness_tables import _ms, markdown, routes_markdown, summarise  # noqa: F401
from torch import Tensor, nn
from tqdm.auto import tqdm

import routesurgeon as rs
from routesurgeon import distributed as rsdist
from routesurgeon import report

# -- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Training budget shared by every method of a recipe run."""

    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] | None = None  # None: every registered method
    single_task: bool = True  # train the single-task baselines for delta_m
    route_methods: tuple[str, ...] = ("drmgf", "drmgf-step")  # exported on the first seed
    route_keep: float = 0.5
    finetune_epochs: int = 1
    recalibrate_batches: int = 0  # > 0: re-estimate each route's BN statistics on this many
    # training batches before fine-tuning (rs.recalibrate; "metric_recalibrated" in routes.json)
    reconstruct: bool = False  # with recalibrate_batches: first re-fit the layers whose inputs
    # were cut on those batches (rs.reconstruct; "metric_reconstructed" in routes.json)
    threads: int = 1
    progress: bool = True
    max_batches: int | None = None  # cap batches per pass (quick modes)
    report_method: str | None = None  # whose first-seed run the HTML report shows (default:
    # the first route method, else the first method)
    # ``tuned-equal`` (recipes/tuned_equal.py): equal weighting at the learning rate, among
    # ``lr * factor``, that scores best on a ``val_fraction`` split held out of the training set
    tuned_lr_factors: tuple[float, ...] = (0.3, 1.0, 3.0)
    val_fraction: float = 0.1


#: The budgets of docs/results.md for the image recipes (1 and 2), every method and three seeds:
#: ``full`` 3 epochs (192 optimiser steps on 2048 images), ``small`` 2 epochs (64 steps on 1024).
FULL_RUN = RunConfig(epochs=3, batch_size=32, seeds=(0, 1, 2))
SMALL_RUN = RunConfig(epochs=2, batch_size=32, seeds=(0, 1, 2))

@dataclass(frozen=True)
class TaskSpec:
    loss: Callable[[Tensor, Tensor], Tensor]
    metrics: tuple[Metric, ...]


@dataclass
class Recipe:
    """What a recipe trains: ``build(seed) -> (model, example_inputs)`` with dict/tuple outputs
    named by ``tasks``; datasets with a ``batch(indices) -> (x, {task: y})`` method."""

    name: str
    build: Callable[[int], tuple[nn.Module, Tensor]]
    tasks: dict[str, TaskSpec]
    train: Any
    test: Any
    description: str = ""
    task_names: Sequence[str] | None = None  # names of the model's outputs, in order (tuples)
    delta_keys: Sequence[str] | None = None  # metrics in delta_m (default: all)
    extra: dict[str, Any] = field(default_factory=dict)


# -- metrics: harness_metrics; torchrun: harness_dist; tables: harness_tables

def train_batches(recipe: Recipe, cfg: RunConfig, seed: int) -> Iterable[Any]:
    """The training batches of one run: the global batches, or this rank's shares of them."""
    batches = Batches(recipe.train, cfg.batch_size, True, seed, cfg.max_batches)
    return Sharded(batches) if rsdist.is_distributed() else batches



# -- data -----------------------------------------------------------------------------------------


class Batches:
    """Seeded, re-iterable mini-batches of a dataset with a ``batch(indices)`` method."""

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool, seed: int = 0,
                 max_batches: int | None = None) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)
        self.max_batches = max_batches

    def __len__(self) -> int:
        n = math.ceil(len(self.dataset) / self.batch_size)
        return min(n, self.max_batches) if self.max_batches else n

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            yield self.dataset.batch(order[b * self.batch_size:(b + 1) * self.batch_size])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def outputs_by_task(out: Any, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Name a model's outputs: dicts by key, tuples by ``tasks`` order; a lone tensor (an
    exported route) is the output of ``tasks[0]``."""
    if isinstance(out, Mapping):
        return dict(out)
    if isinstance(out, (tuple, list)) and len(out) > 1:
        return dict(zip(tasks, out))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return {tasks[0]: out}


@torch.no_grad()
def evaluate(model: Callable[..., Any], loader: Batches, recipe: Recipe,
             tasks: Sequence[str] | None = None) -> dict[str, float]:
    """``{task/metric: value}`` of ``model`` (eval mode) over ``loader``.

    Under torchrun each rank evaluates its part of every batch and the metric sums are
    all-reduced: every rank returns the numbers of the whole test set."""
    names = list(recipe.task_names or recipe.tasks)
    chosen = list(tasks or recipe.tasks)
    if isinstance(model, nn.Module):
        was = model.training
        model.eval()
    sums: dict[str, np.ndarray] = {}
    world, rank = rsdist.world_size(), rsdist.rank()
    for x, ys in loader:
        counted = True
        if len(x) >= world:  # this rank's part of the batch (the parts may differ by one)
            x, ys = x.tensor_split(world)[rank], {t: y.tensor_split(world)[rank]
                                                   for t, y in ys.items()}
        else:  # too small to split: every rank runs it, rank 0 counts it
            counted = rank == 0
        outs = model(x)
        several = isinstance(outs, (tuple, list)) and len(outs) > 1
        outs = outputs_by_task(outs, names if several else chosen)
        for t in chosen:
            for m in recipe.tasks[t].metrics:
                key = f"{t}/{m.name}"
                s = m.stats(outs[t], ys[t])
                s = s if counted else np.zeros_like(s)
                sums[key] = sums[key] + s if key in sums else s
    if isinstance(model, nn.Module):
        model.train(was)
    if world > 1:  # the metric sums of the whole test set, the same on every rank
        keys = sorted(sums)
        flat = torch.from_numpy(np.concatenate([np.asarray(sums[k], np.float64).ravel()
                                                for k in keys]))
        dist.all_reduce(flat)
        parts = np.split(flat.numpy(), np.cumsum([sums[k].size for k in keys])[:-1])
        sums = {k: v.reshape(np.shape(sums[k])) for k, v in zip(keys, parts, strict=True)}
    return {k: next(m for m in recipe.tasks[k.split("/")[0]].metrics
                    if m.name == k.split("/", 1)[1]).finish(v) for k, v in sums.items()}


def higher_better(recipe: Recipe) -> dict[str, bool]:
    return {f"{t}/{m.name}": m.higher_is_better for t, s in recipe.tasks.items() for m in s.metrics}


# -- training -------------------------------------------------------------------------------------


def loss_fns(recipe: Recipe) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    return {t: s.loss for t, s in recipe.tasks.items()}


def train_method(recipe: Recipe, method: str, seed: int, cfg: RunConfig
                 ) -> tuple[rs.Surgeon, rs.Trainer, dict[str, Any]]:
    """Train one method from scratch on seed ``seed``; returns the surgeon, trainer and record."""
    seed_all(seed)
    model, example = recipe.build(seed)
    surgeon = rs.instrument(model, example, tasks=list(recipe.task_names or recipe.tasks))
    optimizer = torch.optim.Adam(surgeon.model_parameters(), lr=cfg.lr)
    config: dict[str, Any] = {"epochs": cfg.epochs} if method == "drmgf" else {}
    trainer = rs.Trainer(surgeon, optimizer, method=method, config=config,
                         progress=cfg.progress)  # detects the process group under torchrun
    train = train_batches(recipe, cfg, seed)
    test = Batches(recipe.test, 256, False)
    t0 = time.perf_counter()
    passes = 0.0
    for _ in range(cfg.epochs):
        record = trainer.fit_epoch(train, loss_fns(recipe))
        passes += float(record.get("passes", 1))
    metrics = evaluate(surgeon, test, recipe)  # once, after the last epoch (CPU budget)
    record["metrics"] = {k: {"metric": v} for k, v in metrics.items()}
    wall = time.perf_counter() - t0
    return surgeon, trainer, {"method": method, "seed": seed, "metrics": metrics,
                              "wall_s": wall, "passes": passes, "skipped": trainer.skipped}


def train_single(recipe: Recipe, task: str, seed: int, cfg: RunConfig) -> dict[str, Any]:
    """The single-task baseline: the same model, optimiser and batches, only ``task``'s loss."""
    seed_all(seed)
    model, _ = recipe.build(seed)
    names = list(recipe.task_names or recipe.tasks)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train = train_batches(recipe, cfg, seed)
    replicate(model)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for x, ys in train:
            optimizer.zero_grad(set_to_none=True)
            out = outputs_by_task(model(x), names)[task]
            recipe.tasks[task].loss(out, ys[task]).backward()
            average_gradients(model)
            optimizer.step()
        average_buffers(model)
    metrics = evaluate(model, Batches(recipe.test, 256, False), recipe, tasks=[task])
    return {"task": task, "seed": seed, "metrics": metrics, "wall_s": time.perf_counter() - t0}


def harness_entries() -> dict[str, Callable[..., tuple[rs.Surgeon, rs.Trainer, dict[str, Any]]]]:
    """Entries of a recipe's method list that are not registered methods but are trained here,
    each like ``train_method``: ``tuned-equal`` (``equal`` with its learning rate chosen on a
    validation split, see ``recipes/tuned_equal.py``)."""
    from tuned_equal import train_tuned_equal

    return {"tuned-equal": train_tuned_equal}


def default_methods() -> list[str]:
    """What a recipe trains when ``RunConfig.methods`` is None: every registered method, then
    the harness entries."""
    return [*rs.available_methods(), *harness_entries()]


# -- routes ---------------------------------------------------------------------------------------


def count_flops(module: Callable[..., Any], x: Tensor) -> int:
    return report.count_flops(module, (x,))  # type: ignore[arg-type]


def latency_ms(module: Callable[..., Any], x: Tensor, repeats: int = 10) -> float:
    return report.measure_latency({"m": module}, (x,), repeats, warmup=1)["m"]  # type: ignore[dict-item]


def finetune_route(route: nn.Module, recipe: Recipe, task: str, cfg: RunConfig, seed: int) -> None:
    """Fine-tune an exported route on its own task loss for ``cfg.finetune_epochs``."""
    optimizer = torch.optim.Adam(route.parameters(), lr=cfg.lr)
    train = train_batches(recipe, cfg, seed + 1)
    replicate(route)
    for _ in range(cfg.finetune_epochs):
        route.train()
        for x, ys in train:
            optimizer.zero_grad(set_to_none=True)
            out = outputs_by_task(route(x), [task])[task]
            recipe.tasks[task].loss(out, ys[task]).backward()
            average_gradients(route)
            optimizer.step()
        average_buffers(route)
    route.eval()


def export_routes(surgeon: rs.Surgeon, recipe: Recipe, cfg: RunConfig, seed: int,
                  tasks: Sequence[str] | None = None, keep: float | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Export each task's route; measure params, FLOPs, latency, and the task metric of the full
    network, of the route, and of the route after fine-tuning."""
    keep = cfg.route_keep if keep is None else keep
    surgeon.eval()
    scores = surgeon.route_scores()
    # the package's default criterion once importance is learned (docs/results.md, route quality)
    routes = surgeon.export_routes(keep=keep, scores=None if scores else "magnitude",
                                   tasks=list(tasks or recipe.tasks))
    x = surgeon.example_inputs()[0][:1]  # FLOPs per image
    bench = next(iter(Batches(recipe.test, 64, False)))[0]
    full_params = sum(p.numel() for p in surgeon.model_parameters())
    full_flops = count_flops(surgeon.eval(), x)
    full_lat = latency_ms(surgeon, bench)
    test = Batches(recipe.test, 256, False)
    full_metrics = evaluate(surgeon, test, recipe)
    out: dict[str, dict[str, Any]] = {}
    for t, route in routes.items():
        before = evaluate(route, test, recipe, tasks=[t])
        recal: dict[str, Any] = {}
        if cfg.recalibrate_batches > 0:
            batches = train_batches(recipe, cfg, seed + 2)
            if cfg.reconstruct:  # least squares on the batches, then their BN statistics
                rs.reconstruct(route, surgeon, batches, cfg.recalibrate_batches)
            else:
                rs.recalibrate(route, batches, cfg.recalibrate_batches)
            key = "metric_reconstructed" if cfg.reconstruct else "metric_recalibrated"
            recal = {key: evaluate(route, test, recipe, tasks=[t])}
        finetune_route(route, recipe, t, cfg, seed)
        after = evaluate(route, test, recipe, tasks=[t])
        out[t] = {
            "keep": keep, "scores": route.meta["routesurgeon"].scores,
            "params": sum(p.numel() for p in route.parameters()), "full_params": full_params,
            "flops": count_flops(route, x), "full_flops": full_flops,
            "latency_ms": latency_ms(route, bench), "full_latency_ms": full_lat,
            "metric_full": {k: v for k, v in full_metrics.items() if k.startswith(f"{t}/")},
            "metric_route": before, "metric_finetuned": after, **recal,
        }
    return out


# -- output directory and report ------------------------------------------------------------------


def fresh_dir(path: str | Path) -> Path:
    """``path`` if it does not exist or is empty, else ``path-2``, ``path-3``, ... (never
    overwrites an earlier run). Under torchrun (the process group is initialised here) only
    rank 0 gets it; the other ranks get a private temporary directory."""
    init_distributed()
    if rsdist.rank() != 0:
        return _scratch_dir()
    p = Path(path)
    candidate, k = p, 1
    while candidate.exists() and any(candidate.iterdir()):
        k += 1
        candidate = p.with_name(f"{p.name}-{k}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def write_report(surgeon: rs.Surgeon, path: Path, history: list[dict[str, Any]],
                 routes: Mapping[str, Mapping[str, Any]] | None, title: str) -> Path:
    """The HTML report: ``surgeon.report`` when the package has it, else ``viz.write_report``."""
    report = getattr(surgeon, "report", None)
    if callable(report):
        try:
            return Path(report(path, history=history, title=title) or path)
        except (ImportError, AttributeError, TypeError, NotImplementedError):
            pass  # the package's report is not there yet: draw it with viz directly
    from routesurgeon.viz import write_report as viz_write

    scores = surgeon.route_scores()
    importance = ({layer: {t: v.detach().cpu().tolist() for t, v in per.items()}
                   for layer, per in scores.items()} if scores else None)
    return viz_write(path, surgeon.topology, importance=importance, history=history,
                     routes=routes, title=title)


def run_recipe(recipe: Recipe, cfg: RunConfig, out: Path,
               after_method: Callable[[str, int, rs.Surgeon], dict[str, Any]] | None = None,
               ) -> dict[str, Any]:
    """Train every method (and the single-task baselines) on every seed; write the results.

    Under torchrun every rank runs this (in step) and returns rank 0's result; rank 0 writes
    ``out``, the others a private temporary directory."""
    init_distributed()
    lead = rsdist.rank() == 0
    if not lead:
        out = _scratch_dir()
        cfg = replace(cfg, progress=False)
    header = distributed_header(cfg)
    if header:
        print(header)
    torch.set_num_threads(cfg.threads)
    methods = list(cfg.methods or default_methods())
    # seed by seed, single-task baselines first: a run stopped early leaves complete seeds
    singles_of = [f"single:{t}" for t in recipe.tasks] if cfg.single_task else []
    jobs = [(s, m) for s in cfg.seeds for m in [*singles_of, *methods]]
    runs: list[dict[str, Any]] = []
    singles: list[dict[str, Any]] = []
    routes: dict[str, dict[str, Any]] = {}
    extras: dict[str, Any] = {}
    report_path: Path | None = None
    t_start = time.perf_counter()
    bar = tqdm(jobs, desc=recipe.name, disable=not cfg.progress)
    for seed, job in bar:
        bar.set_postfix_str(f"seed {seed} {job}")
        if job.startswith("single:"):
            singles.append(train_single(recipe, job.split(":", 1)[1], seed, cfg))
            with (out / "runs.jsonl").open("a") as f:
                f.write(json.dumps({"single": singles[-1]}) + "\n")
            continue
        train_job = harness_entries().get(job, train_method)
        surgeon, trainer, record = train_job(recipe, job, seed, cfg)
        runs.append(record)
        first = seed == cfg.seeds[0]
        if first and job in cfg.route_methods:
            routes[job] = export_routes(surgeon, recipe, cfg, seed)
            (out / "routes.json").write_text(json.dumps(routes, indent=1, default=str))
        if after_method is not None:
            extra = after_method(job, seed, surgeon)
            if extra:
                extras.setdefault(job, {})[seed] = extra
        shown = cfg.report_method or (cfg.route_methods[0] if cfg.route_methods else methods[0])
        if first and job == shown and lead:
            report_path = write_report(surgeon, out / "report.html", trainer.history,
                                       routes.get(job), f"{recipe.name}: {job}, seed {seed}")
            _pictures(surgeon, out)
        with (out / "runs.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
    summary = summarise(higher_better(recipe), runs, singles, recipe.delta_keys)
    result = {"recipe": recipe.name, "description": recipe.description, "config": asdict(cfg),
              "runs": runs, "single_task": singles, "summary": summary, "routes": routes,
              "extras": extras, "report": str(report_path) if report_path else None,
              "total_wall_s": time.perf_counter() - t_start,
              "machine": f"{platform.machine()} {platform.processor()} threads={cfg.threads}"
                         f"{f' x {rsdist.world_size()} processes' if header else ''}",
              "torch": torch.__version__, "distributed": distributed_info(cfg)}
    if rsdist.is_distributed():  # every rank returns rank 0's record (timings, latencies)
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    summary, routes = result["summary"], result["routes"]
    text = markdown(summary, f"{recipe.name} (seeds {list(cfg.seeds)}, {cfg.epochs} epochs)")
    if header:
        title, rest = text.split("\n", 1)
        text = f"{title}\n\n{header}{rest}"
    if routes:
        text += "\n#### Exported routes (first seed)\n\n" + routes_markdown(routes)
    (out / "results.md").write_text(text)
    return result


def _pictures(surgeon: rs.Surgeon, out: Path) -> None:
    """PNG heat map of the learned importance and the sharing topology (needs matplotlib)."""
    try:
        from routesurgeon.viz import save_heatmap, save_topology
    except ImportError:
        return
    save_topology(surgeon, out / "topology.png")
    if surgeon.route_scores():
        save_heatmap(surgeon, out / "importance.png")


# -- command line shared by the recipes ---------------------------------------------------------


def recipe_parser(doc: str | None, out: str, presets: Iterable[str],
                  quick_help: str = "the CI-sized run (preset quick)") -> argparse.ArgumentParser:
    """The options every recipe takes; a recipe adds its own before parsing."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=out)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--preset", choices=sorted(presets), default="default")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--recalibrate-batches", type=int, help="re-estimate each exported route's "
                   "BN statistics on this many training batches (rs.recalibrate)")
    p.add_argument("--reconstruct", action="store_true", default=None,
                   help="with --recalibrate-batches: first re-fit each route's layers whose "
                   "inputs were cut to the full model on those batches (rs.reconstruct)")
    return p


def chosen_preset(presets: Mapping[str, Any], args: argparse.Namespace) -> Any:
    """The preset ``--quick`` / ``--preset`` name, with ``--seeds/--methods/--epochs/--threads``
    applied to its ``run`` config."""
    cfg = presets["quick" if args.quick else args.preset]
    run = cfg.run
    for key in ("seeds", "methods", "epochs", "threads", "recalibrate_batches", "reconstruct"):
        v = getattr(args, key, None)
        if v is not None:
            run = replace(run, **{key: tuple(v) if isinstance(v, list) else v})
    return replace(cfg, run=run)


def run_and_print(recipe: Recipe, cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """A recipe's ``main``: run it into a fresh ``out`` and print its results table."""
    out = fresh_dir(out)
    result = run_recipe(recipe, cfg, out)
    print((out / "results.md").read_text())
    print(f"results, report and pictures in {out}")
    return result
