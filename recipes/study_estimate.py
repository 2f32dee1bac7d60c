"""``python recipes/study.py --estimate``: time a few training steps of every method on the
study's own network and batches, and extrapolate to the whole study (every seed, every epoch,
plus the per-epoch validation and test evaluation)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import harness as h
import study as st
import torch
from torch import nn

import routesurgeon as rs


def _step_seconds(study: st.Study, method: str, splits: dict[str, Any], steps: int) -> float:
    """Seconds of one optimiser step (per pass over a batch) of ``method``, after one warm-up."""
    name, config = st.parse_method(method)
    name = "equal" if name.startswith("single:") else name
    config.pop("lr", None)
    model, example, _ = st.sd.build_model(study.model, study.data, 0, study.size)
    model.to(study.device)
    surgeon = rs.instrument(model, example.to(study.device), tasks=list(study.tasks))
    opt = torch.optim.Adam(surgeon.model_parameters(), lr=study.lr)
    if name == "drmgf":
        config = {"epochs": study.epochs, **config}
    trainer, _ = st._trainer(surgeon, opt, name, config, study, False)
    losses: dict[str, Any] = {t: nn.functional.cross_entropy for t in study.tasks}
    passes = st.passes_per_epoch(method, study)
    clock = _clock(study)
    trainer.fit_epoch(h.Batches(splits["train"], study.batch_size, True, 0, 1), losses)
    st._sync(study)
    t0 = clock()
    trainer.fit_epoch(h.Batches(splits["train"], study.batch_size, True, 1, steps), losses)
    st._sync(study)
    return (clock() - t0) / (steps * passes)


def _clock(study: st.Study) -> Any:
    """CPU time of this process on the CPU (a shared machine does not inflate it), wall time on
    a device."""
    return time.process_time if study.device == "cpu" else time.perf_counter


def report(study: st.Study, methods: Sequence[str], phase: str, steps: int = 3) -> str:
    """A table of seconds per step, per run and in all, for ``study`` in ``phase``."""
    splits = st.load_splits(study)
    steps_per_epoch = math.ceil(len(splits["train"]) / study.batch_size)
    model, _, _ = st.sd.build_model(study.model, study.data, 0, study.size)
    model.to(study.device).eval()
    recipe = st.make_recipe(study, splits)
    clock = _clock(study)
    t0 = clock()
    h.evaluate(model, h.Batches(splits["val"], 1024, False, 0, 2), recipe)
    per_image = (clock() - t0) / min(len(splits["val"]), 2048)
    eval_epoch = per_image * (len(splits["val"]) + len(splits["test"]))
    kind = "CPU" if study.device == "cpu" else "wall"
    lines = [f"Estimate for study {study.name} ({phase} phase): {len(splits['train'])} train "
             f"images, batch {study.batch_size} ({steps_per_epoch} steps per pass), "
             f"{len(study.seeds)} seeds, {study.device}, {torch.get_num_threads()} thread(s); "
             f"{steps} timed steps per method after one warm-up ({kind} seconds); "
             f"evaluation of validation + "
             f"test {eval_epoch:.1f} s per epoch",
             "", "| method | s / step | epochs | passes | s / run | s, all seeds |",
             "|---|---|---|---|---|---|"]
    total = 0.0
    for m in methods:
        sec = _step_seconds(study, m, splits, steps)
        epochs = st.target_epochs(m, study, phase)
        passes = epochs * st.passes_per_epoch(m, study)
        run = sec * steps_per_epoch * passes + eval_epoch * epochs
        total += run * len(study.seeds)
        lines.append(f"| {m} | {sec:.4f} | {epochs} | {passes} | {run:.0f} | "
                     f"{run * len(study.seeds):.0f} |")
    lines += ["", f"TOTAL: {total:.0f} s = {total / 3600:.2f} hours of one "
              f"{'core' if study.device == 'cpu' else 'device'} on an otherwise idle machine "
              f"(a shared machine takes proportionally longer)"]
    return "\n".join(lines)
