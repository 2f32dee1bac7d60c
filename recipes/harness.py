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

import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from harness_cli import chosen_preset, recipe_parser  # noqa: F401
from harness_data import (
    Batches,
    evaluate,
    higher_better,
    outputs_by_task,
    seed_all,
    train_batches,
)

# re-exported: the recipes use them as harness.X
from harness_dist import (
    _scratch_dir,
    average_buffers,
    average_gradients,
    distributed_header,
    distributed_info,
    init_distributed,
    replicate,
)
from harness_metrics import Metric, abs_err, accuracy, angle_err, delta_m, miou, mse, pixel_acc  # noqa: F401
from harness_routes import count_flops, export_routes, finetune_route, latency_ms  # noqa: F401
from harness_tables import _ms, markdown, routes_markdown, summarise  # noqa: F401
from torch import Tensor, nn
from tqdm.auto import tqdm

import routesurgeon as rs
from routesurgeon import distributed as rsdist

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


# -- metrics: harness_metrics; data and evaluation: harness_data; torchrun: harness_dist;
# -- routes: harness_routes; tables: harness_tables; command line: harness_cli


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



def run_and_print(recipe: Recipe, cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """A recipe's ``main``: run it into a fresh ``out`` and print its results table."""
    out = fresh_dir(out)
    result = run_recipe(recipe, cfg, out)
    print((out / "results.md").read_text())
    print(f"results, report and pictures in {out}")
    return result
