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
import atexit
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

import routesurgeon as rs
from routesurgeon import distributed as rsdist
from routesurgeon import report
from routesurgeon.metrics import MetricSpec
from routesurgeon.metrics import delta_m as package_delta_m

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
class Metric:
    """A test metric accumulated over batches: ``stats(out, target)`` returns an array summed
    over batches, ``finish(sum)`` turns the sum into the value."""

    name: str
    stats: Callable[[Tensor, Tensor], np.ndarray]
    finish: Callable[[np.ndarray], float]
    higher_is_better: bool


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


# -- metrics --------------------------------------------------------------------------------------


def accuracy(name: str = "acc") -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        return np.array([float((out.argmax(1) == y).sum()), float(y.numel())])

    return Metric(name, stats, lambda s: float(s[0] / max(s[1], 1)), True)


def miou(num_classes: int) -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        pred = out.argmax(1).flatten()
        idx = y.flatten() * num_classes + pred
        return torch.bincount(idx, minlength=num_classes**2).double().numpy()

    def finish(s: np.ndarray) -> float:
        cm = s.reshape(num_classes, num_classes)
        inter = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - inter
        return float(np.mean(inter[union > 0] / union[union > 0]))

    return Metric("mIoU", stats, finish, True)


def pixel_acc() -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        return np.array([float((out.argmax(1) == y).sum()), float(y.numel())])

    return Metric("pix_acc", stats, lambda s: float(s[0] / max(s[1], 1)), True)


def abs_err(name: str = "abs_err") -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        return np.array([float((out - y).abs().sum()), float(y.numel())])

    return Metric(name, stats, lambda s: float(s[0] / max(s[1], 1)), False)


def mse(name: str = "mse") -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        return np.array([float(((out - y) ** 2).sum()), float(y.numel())])

    return Metric(name, stats, lambda s: float(s[0] / max(s[1], 1)), False)


def angle_err() -> Metric:
    """Mean angle (degrees) between predicted and true unit normals."""

    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        cos = (nn.functional.normalize(out, dim=1) * y).sum(1).clamp(-1, 1)
        ang = torch.rad2deg(torch.acos(cos))
        return np.array([float(ang.sum()), float(ang.numel())])

    return Metric("angle_deg", stats, lambda s: float(s[0] / max(s[1], 1)), False)


def delta_m(metrics: Mapping[str, float], reference: Mapping[str, float],
            higher_is_better: Mapping[str, bool]) -> float | None:
    """Maninis et al.'s delta_m in percent (``routesurgeon.metrics.delta_m``: mean over metrics of
    the signed relative difference to the single-task reference; lower is better). ``None``
    when a reference value is 0 (undefined)."""
    specs = {k: MetricSpec(k.split("/")[0], hib) for k, hib in higher_is_better.items()}
    if any(reference[k] == 0 for k in specs):
        return None
    return package_delta_m({k: metrics[k] for k in specs}, {k: reference[k] for k in specs},
                           specs)


# -- torchrun -------------------------------------------------------------------------------------

_SCRATCH: list[Path] = []  # the private output directory of a rank other than 0


def init_distributed() -> int:
    """Initialise the process group once when launched by ``torchrun`` with more than one process
    (``WORLD_SIZE`` > 1); return the world size (1 in a plain run).

    The harness trains on CPU, so gloo carries its tensors; with CUDA available the group is
    ``cpu:gloo,cuda:nccl`` (CUDA tensors would go through nccl). Ranks other than 0 print
    nothing (stdout to /dev/null; errors still reach stderr). The group is destroyed at exit.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(_finish_distributed)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return dist.get_world_size()


def _finish_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for path in _SCRATCH:
        shutil.rmtree(path, ignore_errors=True)


def _scratch_dir() -> Path:
    """A rank > 0's own output directory: what a recipe writes there is thrown away at exit."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix=f"routesurgeon-rank{rsdist.rank()}-")))
    return _SCRATCH[0]


def distributed_info(cfg: RunConfig) -> dict[str, Any]:
    """What ``results.json`` records about the process group (world size 1 in a plain run)."""
    world = rsdist.world_size()
    info: dict[str, Any] = {"world_size": world}
    if world > 1:
        info.update(backend=str(dist.get_backend()), per_rank_batch=cfg.batch_size // world,
                    batchnorm="train-mode BatchNorm normalises with each rank's share of the "
                              "batch (per-shard statistics; SyncBatchNorm needs GPUs); running "
                              "statistics are averaged over ranks after each epoch")
    return info


def distributed_header(cfg: RunConfig) -> str:
    """The line ``results.md`` and the console start with when the run has several processes."""
    world = rsdist.world_size()
    if world == 1:
        return ""
    return (f"Distributed: {world} processes ({dist.get_backend()}), each trains on 1/{world} of "
            f"every global batch of {cfg.batch_size} (gradients averaged: equal to one process "
            f"up to float rounding), except that BatchNorm in train mode uses per-shard "
            f"statistics ({cfg.batch_size // world} samples; SyncBatchNorm needs GPUs). A global "
            f"batch that does not split into {world} equal shares loses its last samples.\n")


class Sharded:
    """This rank's equal share of every global batch of ``batches``; a global batch whose size is
    not a multiple of the world size first loses its last ``size % world`` samples (equal
    shares keep the averaged gradient equal to the trimmed global batch's)."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        world = rsdist.world_size()
        for x, ys in self.batches:
            keep = len(x) - len(x) % world
            if keep:
                yield rsdist.shard((x[:keep], {t: y[:keep] for t, y in ys.items()}))


def train_batches(recipe: Recipe, cfg: RunConfig, seed: int) -> Iterable[Any]:
    """The training batches of one run: the global batches, or this rank's shares of them."""
    batches = Batches(recipe.train, cfg.batch_size, True, seed, cfg.max_batches)
    return Sharded(batches) if rsdist.is_distributed() else batches


def replicate(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (a no-op in one process)."""
    rsdist.broadcast_tensors([t for t in model.state_dict().values() if t.is_floating_point()])


def average_gradients(model: nn.Module) -> None:
    """Average ``.grad`` over ranks in one all-reduce (a no-op in one process)."""
    rsdist.all_reduce_mean([p.grad for p in model.parameters() if p.grad is not None])


def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks."""
    rsdist.all_reduce_mean([b for b in model.buffers() if b.is_floating_point()])


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


# -- tables ---------------------------------------------------------------------------------------


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
