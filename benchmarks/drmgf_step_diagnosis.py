"""Why does ``drmgf-step`` not beat equal weighting? Measurements on a trained study run.

Loads a ``drmgf-step`` checkpoint of ``recipes/study.py`` and, on validation batches, reports per
shared layer:

- ``polarization`` of the learned dominance D (0: every filter shared equally, 1: every filter
  owned by one task; see ``recipes/study.py polarization``), over the filters some task values;
- ``filters with D = 0``: the fraction whose importance is 0 for every task (their fused gradient
  is 0 until a task's importance of them grows again);
- ``cos(fused, equal)``: cosine between the fused gradient ``sum_t T D_t g_t`` and the
  equal-weight gradient ``sum_t g_t`` of that layer's weight (1: drmgf-step changes nothing);
- ``cos(g_a, g_b)``: cosine between the two tasks' gradients there (conflict: < 0);
- ``batch D noise``: the dominance a single batch's Taylor scores give, against the EMA's: the
  mean absolute difference per filter (how noisy one step's importance estimate is);
- ``D sign agreement``: the fraction of filters whose single-batch dominance favours the same task
  as the EMA's.

    python benchmarks/drmgf_step_diagnosis.py --out runs/study --study r1-fashion-lenet --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import harness as h
import study as st

import routesurgeon as rs
from routesurgeon.importance import dominance


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    p.add_argument("--study", default="r1-fashion-lenet", choices=sorted(st.STUDIES))
    p.add_argument("--method", default="drmgf-step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=8)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    study = st.STUDIES[a.study]
    splits = st.load_splits(study)
    name, config = st.parse_method(a.method)
    config.pop("lr", None)
    model, example, _ = st.sd.build_model(study.model, study.data, a.seed, study.size)
    surgeon = rs.instrument(model, example, tasks=list(study.tasks))
    opt = torch.optim.Adam(surgeon.model_parameters(), lr=study.lr)
    trainer = rs.Trainer(surgeon, opt, method=name, config=config, progress=False)
    ckpt = a.out / "checkpoints" / f"{a.study}/{a.method}/{a.seed}.pt".replace(":", "_")
    trainer.load_checkpoint(str(ckpt))
    bank = surgeon.importance_bank
    params = dict(surgeon.model.named_parameters())
    modules = {n.rsplit(".", 1)[0]: n for n in bank.names}
    stats: dict[str, dict[str, list[float]]] = {n: {} for n in bank.names}

    def add(layer: str, key: str, v: float) -> None:
        stats[layer].setdefault(key, []).append(v)

    surgeon.train()
    for x, ys in h.Batches(splits["val"], study.batch_size, True, 0, a.batches):
        captured: dict[str, torch.Tensor] = {}
        hooks = [surgeon.model.get_submodule(m).register_forward_hook(
            lambda mod, i, o, m=m, c=captured: c.__setitem__(m, o)) for m in modules]
        out = surgeon.model(x)
        for hk in hooks:
            hk.remove()
        losses = {t: F.cross_entropy(out[t], ys[t]) for t in study.tasks}
        for m, wname in modules.items():
            tasks = bank.tasks_of[wname]
            y = captured[m]
            gw, scores = [], []
            for t in tasks:
                gy, g = torch.autograd.grad(losses[t], [y, params[wname]], retain_graph=True)
                gw.append(g)
                dims = [d for d in range(y.dim()) if d != 1]
                scores.append((y.detach() * gy).sum(dim=[d for d in dims if d != 0])
                              .abs().sum(0) if y.dim() > 2 else (y.detach() * gy).abs().sum(0))
            d = bank.dominance(wname).detach()
            d = d.mean(-1) if d.dim() == 3 else d
            shape = (-1, *[1] * (gw[0].dim() - 1))
            fused = sum(len(tasks) * d[j].reshape(shape) * gw[j] for j in range(len(tasks)))
            equal = sum(gw)
            add(wname, "cos(fused, equal)",
                float(F.cosine_similarity(fused.flatten(), equal.flatten(), dim=0)))
            add(wname, "cos(g_a, g_b)",
                float(F.cosine_similarity(gw[0].flatten(), gw[1].flatten(), dim=0)))
            db = dominance(scores, [torch.ones_like(s) for s in scores])
            add(wname, "batch D noise", float((db - d).abs().mean()))
            add(wname, "D sign agreement", float((db.argmax(0) == d.argmax(0)).float().mean()))
            n = d.shape[0]
            live = d.sum(0) > 0  # D = 0 for every task: the filter's fused gradient is 0
            add(wname, "filters with D = 0", float((~live).float().mean()))
            add(wname, "polarization",
                float(((d.max(0).values[live] - 1 / n) / (1 - 1 / n)).mean()))
    keys = ["polarization", "filters with D = 0", "cos(fused, equal)", "cos(g_a, g_b)",
            "batch D noise", "D sign agreement"]
    lines = [f"{a.study} {a.method} seed {a.seed}, {a.batches} validation batches of "
             f"{study.batch_size}", "", "| layer | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for wname, per in stats.items():
        lines.append(f"| {wname} | " + " | ".join(
            f"{sum(per[k]) / len(per[k]):.3f}" for k in keys) + " |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
