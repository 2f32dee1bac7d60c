"""Recipe: a torchvision detector's shared part, backbone + FPN + heads, one route per head.

A full torchvision detector cannot be traced (its transform, anchor matching and post-processing
are data-dependent; ``rs.instrument`` on it says so). What training shares is the backbone, the
FPN and the heads: ``rs.detection_heads(model)`` wraps that part, and its heads are the tasks
(RetinaNet: ``cls_logits`` and ``bbox_regression``). This recipe builds a RetinaNet (random init:
``weights=None, weights_backbone=None``), makes synthetic images with one bright square each
(its colour channel is its class), matches the detector's own anchors to the square (IoU >= 0.4,
and the best anchor) for focal-loss classification targets and box-regression targets (the
detector's ``BoxCoder``), trains a few steps with two methods (``equal`` and ``drmgf-step``), and
exports one numerically verified route per head.

    python recipes/detection.py --quick          # a ResNet-18 FPN RetinaNet at 64x64, 3 steps
    python recipes/detection.py --steps 20       # retinanet_resnet50_fpn at 128x128
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import routesurgeon as rs


@dataclass(frozen=True)
class Config:
    size: int = 128
    batch: int = 4
    steps: int = 20
    classes: int = 3
    keep: float = 0.5
    small: bool = False  # a ResNet-18 FPN backbone instead of ResNet-50
    methods: tuple[str, ...] = ("equal", "drmgf-step")


def build_detector(cfg: Config) -> nn.Module:
    from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    sizes = {"min_size": cfg.size, "max_size": cfg.size}
    if not cfg.small:
        return retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                      num_classes=cfg.classes, **sizes)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=cfg.classes, **sizes)


def synthetic_batch(detector: Any, heads: rs.DetectionHeads, cfg: Config, seed: int
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """Images with one square each and per-anchor targets for both heads."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(cfg.batch, 3, cfg.size, cfg.size, generator=g) * 0.2
    labels = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
    boxes = []
    for i in range(cfg.batch):
        side = int(torch.randint(cfg.size // 4, cfg.size // 2, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, cfg.size - side, (2,), generator=g))
        x[i, int(labels[i]) % 3, y0:y0 + side, x0:x0 + side] = 1.0
        boxes.append(torch.tensor([x0, y0, x0 + side, y0 + side], dtype=torch.float32))
    with torch.no_grad():
        feats = heads.features(x)
        anchors = detector.anchor_generator(ImageList(x, [(cfg.size, cfg.size)] * cfg.batch),
                                            feats)
    n = anchors[0].shape[0]
    cls = torch.zeros(cfg.batch, n, cfg.classes)
    box = torch.zeros(cfg.batch, n, 5)  # positive mask, then the encoded box offsets
    for i in range(cfg.batch):
        iou = box_iou(boxes[i][None], anchors[i])[0]
        pos = iou >= 0.4
        pos[iou.argmax()] = True
        cls[i, pos, labels[i]] = 1.0
        enc = detector.box_coder.encode_single(boxes[i].expand(int(pos.sum()), 4), anchors[i][pos])
        box[i, pos, 0] = 1.0
        box[i, pos, 1:] = enc
    return x, {"cls_logits": cls, "bbox_regression": box}


def focal(out: Tensor, target: Tensor) -> Tensor:
    from torchvision.ops import sigmoid_focal_loss

    npos = target.sum().clamp(min=1.0)
    return sigmoid_focal_loss(out, target, reduction="sum") / npos


def box_l1(out: Tensor, target: Tensor) -> Tensor:
    mask = target[..., :1]
    return ((out - target[..., 1:]).abs() * mask).sum() / mask.sum().clamp(min=1.0)


LOSSES = {"cls_logits": focal, "bbox_regression": box_l1}


def run(cfg: Config) -> dict[str, Any]:
    results: dict[str, Any] = {"config": cfg.__dict__ | {"methods": list(cfg.methods)}}
    try:  # the full model cannot be traced: the error names the part to instrument
        full = build_detector(cfg).eval()
        rs.instrument(full, ([torch.rand(3, cfg.size, cfg.size)],))
        results["full_model"] = "traced"
    except rs.TracingError as e:
        results["full_model"] = str(e).split("\n")[0]
    for method in cfg.methods:
        torch.manual_seed(0)
        detector = build_detector(cfg)
        heads = rs.detection_heads(detector).eval()
        x0, _ = synthetic_batch(detector, heads, cfg, seed=0)
        surgeon = rs.instrument(heads, x0)
        opt = torch.optim.SGD(surgeon.model_parameters(), lr=0.01, momentum=0.9)
        trainer = rs.Trainer(surgeon, opt, method=method, progress=False)
        losses = []
        for step in range(cfg.steps):
            x, targets = synthetic_batch(detector, heads, cfg, seed=step + 1)
            stats = trainer.train_step(x, targets, LOSSES)
            losses.append(stats)
        surgeon.eval()
        routes = surgeon.export_routes(keep=cfg.keep, scores=None if method != "equal"
                                       else "magnitude")
        params = {t: sum(p.numel() for p in r.parameters()) for t, r in routes.items()}
        results[method] = {
            "tasks": surgeon.tasks,
            "shared_params": sum(p.numel() for p in surgeon.shared_parameters()),
            "first_losses": losses[0], "last_losses": losses[-1],
            "route_params": params,
            "route_scores": sorted({r.meta["routesurgeon"].scores for r in routes.values()}),
            "route_kept": {t: round(r.meta["routesurgeon"].mask.kept_fraction, 3)
                           for t, r in routes.items()},
            "model_params": sum(p.numel() for p in heads.parameters()),
        }
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-18 FPN, 64x64, 3 steps")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    cfg = (Config(size=64, batch=2, steps=3, small=True) if a.quick
           else Config(size=a.size, steps=a.steps))
    results = run(cfg)
    text = json.dumps(results, indent=1, default=str)
    if a.out:
        with open(a.out, "x") as f:  # never overwrite a saved result
            f.write(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
