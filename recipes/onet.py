"""Recipe 4: surgery on the pretrained MTCNN O-Net (face/no-face, box, landmarks).

The O-Net of ``facenet-pytorch`` (packaged weights) is fine-tuned with every method on half of
scikit-image's ``lfw_subset`` (50 faces + 50 non-faces, upscaled to 48x48): the face head on the
labels, the box and landmark heads on the pretrained net's own outputs (distillation, since
``lfw_subset`` has no boxes). The importance learned from real faces and non-faces then picks the
face/no-face route, exported at several keep fractions (``surgeon.export_routes(tasks=["face"])``)
and compared with the full network: parameters, FLOPs, latency, AUC and accuracy on the other
half, before and after fine-tuning the route.

    python recipes/onet.py --out runs/onet
    python recipes/onet.py --quick --out runs/onetq
    python recipes/onet.py --preset full --out runs/onetfull
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

import routesurgeon as rs
from routesurgeon.datasets import TaskTensors, lfw_faces
from routesurgeon.pretrained import ONet, onet

TASKS = ("box", "landmarks", "face")  # the O-Net's outputs, in order


@dataclass(frozen=True)
class Config:
    keeps: tuple[float, ...] = (0.75, 0.5, 0.25)  # face-route keep fractions
    route_export_methods: tuple[str, ...] = ("drmgf", "drmgf-step", "equal")
    run: h.RunConfig = field(default_factory=lambda: h.RunConfig(
        epochs=10, batch_size=20, lr=1e-4, route_methods=(), finetune_epochs=5,
        report_method="drmgf-step"))


PRESETS = {
    "quick": Config(keeps=(0.5,), route_export_methods=("drmgf-step",),
                    run=h.RunConfig(epochs=2, batch_size=20, lr=1e-4, route_methods=(),
                                    finetune_epochs=1, methods=("equal", "drmgf-step"),
                                    progress=False, report_method="drmgf-step")),
    "default": Config(),
    "full": Config(run=h.RunConfig(epochs=6, batch_size=20, lr=1e-4, route_methods=(),
                                   finetune_epochs=3, seeds=(0, 1, 2),
                                   report_method="drmgf-step")),
}


def face_auc() -> h.Metric:
    """ROC AUC of the face logit margin, from 4,000-bin histograms of faces and non-faces
    (summable over batches; ties within a bin count one half)."""
    edges = np.linspace(-30, 30, 4001)

    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        margin = (out[:, 1] - out[:, 0]).clamp(-30, 30).numpy()
        pos = np.histogram(margin[y.numpy() == 1], edges)[0]
        neg = np.histogram(margin[y.numpy() == 0], edges)[0]
        return np.concatenate([pos, neg]).astype(np.float64)

    def finish(s: np.ndarray) -> float:
        pos, neg = s[:4000], s[4000:]
        if pos.sum() == 0 or neg.sum() == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives in lower bins
        return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))

    return h.Metric("auc", stats, finish, True)


def lfw_split() -> tuple[TaskTensors, TaskTensors]:
    """Even-indexed faces/non-faces for training, odd-indexed for testing; 48x48 RGB scaled like
    MTCNN ((x - 127.5) / 128); box/landmark targets from the pretrained O-Net."""
    images, labels = lfw_faces()
    x = torch.from_numpy(images).float()[:, None]
    x = nn.functional.interpolate(x, size=48, mode="bilinear", align_corners=False)
    x = ((x - 127.5) / 128).expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad():
        box, landmarks, _ = onet(logits=True)(x)
    y = torch.from_numpy(labels)
    idx = torch.arange(len(y))

    def part(sel: Tensor) -> TaskTensors:
        return TaskTensors(x[sel], {"box": box[sel], "landmarks": landmarks[sel],
                                    "face": y[sel]}, channels=3)

    return part(idx[idx % 2 == 0]), part(idx[idx % 2 == 1])


def build_model(seed: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(seed)
    return onet(logits=True).train(), torch.zeros(2, 3, 48, 48)


def make_recipe() -> h.Recipe:
    train, test = lfw_split()
    mse = nn.functional.mse_loss
    tasks = {
        "box": h.TaskSpec(mse, (h.mse("mse"),)),
        "landmarks": h.TaskSpec(mse, (h.mse("mse"),)),
        "face": h.TaskSpec(nn.functional.cross_entropy, (face_auc(), h.accuracy())),
    }
    desc = ("MTCNN O-Net (facenet-pytorch 2.6.0 weights) on skimage lfw_subset: 100 train / 100 "
            "test images (even/odd indices, 50 faces + 50 non-faces each), 48x48; box/landmark "
            "targets = the pretrained net's outputs")
    # delta_m over the face metrics only: the box/landmark single-task references distil the
    # pretrained net's own outputs, so their error is 0 and a relative difference is undefined
    return h.Recipe("O-Net surgery", build_model, tasks, train, test, desc,
                    task_names=list(TASKS), delta_keys=("face/auc", "face/acc"))


def route_hook(recipe: h.Recipe, cfg: Config
               ) -> Callable[[str, int, rs.Surgeon], dict[str, Any] | None]:
    def hook(method: str, seed: int, surgeon: rs.Surgeon) -> dict[str, Any] | None:
        if method not in cfg.route_export_methods:
            return None
        return {str(k): h.export_routes(surgeon, recipe, cfg.run, seed, tasks=["face"], keep=k)
                ["face"] for k in cfg.keeps}

    return hook


def routes_table(result: dict[str, Any]) -> str:
    """Face routes per method and keep fraction: mean (± std over seeds)."""
    lines = ["| method | scores | keep | params | FLOPs/img | latency ms (batch 64) | AUC full | "
             "AUC route | AUC route fine-tuned | acc route fine-tuned |", "|" + "---|" * 10]

    def ms(v: list[float], fmt: str = "{:.4f}") -> str:
        if len(v) == 1:
            return fmt.format(v[0])
        return fmt.format(statistics.mean(v)) + " ± " + fmt.format(statistics.stdev(v))

    for method, per_seed in result["extras"].items():
        seeds = list(per_seed.values())
        for k in seeds[0]:
            rows = [s[k] for s in seeds]
            r0 = rows[0]
            lines.append(
                f"| {method} | {r0['scores']} | {k} | {r0['params']:,} / {r0['full_params']:,} | "
                f"{r0['flops'] / 1e6:.2f}M / {r0['full_flops'] / 1e6:.2f}M | "
                f"{ms([r['latency_ms'] for r in rows], '{:.2f}')} / "
                f"{ms([r['full_latency_ms'] for r in rows], '{:.2f}')} | "
                f"{ms([r['metric_full']['face/auc'] for r in rows])} | "
                f"{ms([r['metric_route']['face/auc'] for r in rows])} | "
                f"{ms([r['metric_finetuned']['face/auc'] for r in rows])} | "
                f"{ms([r['metric_finetuned']['face/acc'] for r in rows])} |")
    return "\n".join(lines) + "\n"


def pretrained_baseline(recipe: h.Recipe) -> dict[str, float]:
    """The untouched pretrained O-Net on the test half (the reference for everything else)."""
    model: ONet = onet(logits=True)
    return h.evaluate(model, h.Batches(recipe.test, 256, False), recipe)


def parse(argv: list[str] | None = None) -> tuple[Config, Path]:
    p = h.recipe_parser(__doc__, "runs/onet", PRESETS,
                        quick_help="a seconds-sized run (preset quick)")
    a = p.parse_args(argv)
    cfg = h.chosen_preset(PRESETS, a)
    return cfg, Path(a.out)


def run(cfg: Config, out: Path) -> dict[str, Any]:
    recipe = make_recipe()
    base = pretrained_baseline(recipe)
    result = h.run_recipe(recipe, cfg.run, out, after_method=route_hook(recipe, cfg))
    text = ("Pretrained O-Net, untouched: "
            + ", ".join(f"{k} {v:.4g}" for k, v in base.items()) + "\n\n"
            + "#### Face/no-face routes\n\n" + routes_table(result))
    (out / "routes.md").write_text(text)
    result["pretrained"] = base
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, out = parse(argv)
    out = h.fresh_dir(out)
    result = run(cfg, out)
    print((out / "results.md").read_text())
    print((out / "routes.md").read_text())
    print(f"results, report and pictures in {out}")
    return result


if __name__ == "__main__":
    main()
