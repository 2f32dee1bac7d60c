"""The part of a torchvision detection model that training shares: backbone + FPN + heads.

A full torchvision detector (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD) resizes a list of
images, generates anchors, and in eval mode decodes boxes, runs NMS and returns a variable number
of detections per image: data-dependent code that ``torch.fx`` cannot trace. Training shares the
backbone, the FPN and the heads, and that part is a plain multi-output network:
``detection_heads(model)`` wraps it, taking a batch of images (already normalised and resized, as
``model.transform`` would) and returning one tensor per head, each a task:

* RetinaNet: ``cls_logits`` (N, HWA, K) and ``bbox_regression`` (N, HWA, 4);
* FCOS: ``cls_logits``, ``bbox_regression`` and ``bbox_ctrness``;
* SSD / SSDlite: ``cls_logits`` and ``bbox_regression``;
* Faster / Mask / Keypoint R-CNN: the RPN's ``objectness`` (N*HWA, 1) and ``rpn_bbox_deltas``
  (N*HWA, 4) (the RoI heads run on sampled proposals, which depend on the data).

The wrapper holds the detector's own modules, so routes exported from it prune the detector's
layers and its training updates the detector.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from routesurgeon.errors import InputError

__all__ = ["DetectionHeads", "detection_heads", "detection_kind"]

_KINDS = {"RetinaNet": "retinanet", "FCOS": "fcos", "SSD": "ssd", "GeneralizedRCNN": "rcnn"}


def detection_kind(model: nn.Module) -> str | None:
    """``"retinanet"``, ``"fcos"``, ``"ssd"`` or ``"rcnn"`` for a torchvision detector, else
    None."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("torchvision.models.detection") and cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return None


class DetectionHeads(nn.Module):
    """Backbone + FPN + heads of a torchvision detector: ``{head: tensor}`` (see the module)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        kind = detection_kind(detector)
        if kind is None:
            raise InputError(f"{type(detector).__name__} is not a torchvision detection model "
                             f"(RetinaNet, FCOS, SSD or a GeneralizedRCNN)")
        self.kind = kind
        parts: Any = detector
        self.backbone: nn.Module = parts.backbone
        self.head: nn.Module = parts.rpn.head if kind == "rcnn" else parts.head
        self.tasks: tuple[str, ...] = {
            "retinanet": ("cls_logits", "bbox_regression"),
            "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness"),
            "ssd": ("cls_logits", "bbox_regression"),
            "rcnn": ("objectness", "rpn_bbox_deltas"),
        }[kind]

    def features(self, x: Tensor) -> list[Tensor]:
        feats: Any = self.backbone(x)
        return list(feats.values()) if isinstance(feats, dict) else [feats]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.features(x)
        head: Any = self.head
        if self.kind == "retinanet":
            return {"cls_logits": head.classification_head(feats),
                    "bbox_regression": head.regression_head(feats)}
        if self.kind in ("fcos", "ssd"):
            out = head(feats)
            return {t: out[t] for t in self.tasks}
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        objectness, deltas = head(feats)
        obj, box = concat_box_prediction_layers(objectness, deltas)
        return {"objectness": obj, "rpn_bbox_deltas": box}


def detection_heads(model: nn.Module) -> DetectionHeads:
    """The shared part of a torchvision detector, to instrument instead of the full model."""
    return DetectionHeads(model)


def refusal(model: nn.Module) -> str | None:
    """Why a full torchvision detector cannot be traced, and what to instrument instead."""
    kind = detection_kind(model)
    if kind is None:
        return None
    name = type(model).__name__
    return (f"{name} is a full torchvision detection model: its transform (a list of images of "
            f"any size), anchor matching and eval-mode post-processing (box decoding, NMS, a "
            f"data-dependent number of detections) cannot be traced by torch.fx. Instrument the "
            f"part training shares instead, backbone + FPN + heads: "
            f"routesurgeon.detection_heads(model) (tasks: the heads' outputs), or "
            f"build_model('tv:NAME:heads') on the command line; see recipes/detection.py.")
