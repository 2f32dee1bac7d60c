"""The recipes' exported routes: each task's route measured (params, FLOPs, latency, metric) as
exported, re-fitted or recalibrated, and fine-tuned (see ``harness``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from harness_data import Batches, evaluate, outputs_by_task, train_batches
from harness_dist import average_buffers, average_gradients, replicate
from torch import Tensor, nn

import routesurgeon as rs
from routesurgeon import report

if TYPE_CHECKING:
    from harness import Recipe, RunConfig


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
