"""Detection: a torchvision detector's backbone + FPN + heads, and the full model's error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import routesurgeon as rs
from routesurgeon.errors import TracingError

tv_det = pytest.importorskip("torchvision.models.detection")


def _small_retinanet() -> torch.nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    return tv_det.RetinaNet(backbone, num_classes=3, min_size=64, max_size=64)


def test_full_detector_is_refused_with_the_part_to_instrument() -> None:
    model = _small_retinanet().eval()
    with pytest.raises(TracingError, match=r"RetinaNet is a full torchvision detection model.*"
                                           r"post-processing.*detection_heads\(model\)"):
        rs.instrument(model, ([torch.rand(3, 64, 64)],))


def test_retinanet_heads_trace_and_export_one_route_per_head() -> None:
    model = _small_retinanet()
    heads = rs.detection_heads(model).eval()
    x = torch.randn(2, 3, 64, 64)
    s = rs.instrument(heads, x)
    assert s.tasks == ["cls_logits", "bbox_regression"]
    tasks_of = s.param_tasks()
    assert tasks_of["backbone.body.conv1.weight"] == frozenset(s.tasks)  # shared backbone + FPN
    assert tasks_of["head.classification_head.cls_logits.weight"] == frozenset(["cls_logits"])
    routes = s.export_routes(keep=1.0)
    with torch.no_grad():
        want = heads(x)
        for t, route in routes.items():
            assert torch.allclose(route(x), want[t], atol=1e-5), t
    # the routes hold the detector's own layers: only the other head is left out
    n = {t: sum(p.numel() for p in r.parameters()) for t, r in routes.items()}
    cls_head = sum(p.numel() for p in model.head.classification_head.parameters())
    assert n["cls_logits"] == sum(p.numel() for p in heads.parameters()) - sum(
        p.numel() for p in model.head.regression_head.parameters())
    assert n["bbox_regression"] == sum(p.numel() for p in heads.parameters()) - cls_head


def test_rcnn_heads_are_the_rpn_outputs() -> None:
    built = rs.build_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn:heads", input_size=64)
    s = rs.instrument(built.model, built.example_inputs)
    assert s.tasks == built.tasks == ["objectness", "rpn_bbox_deltas"]
    routes = s.export_routes(keep=1.0)
    assert sorted(routes) == sorted(s.tasks)


def test_detection_recipe_quick() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import detection  # type: ignore[import-not-found]

    res = detection.main(["--quick"])
    assert "cannot be traced" in res["full_model"] and "detection_heads" in res["full_model"]
    for method in ("equal", "drmgf-step"):
        r = res[method]
        assert r["tasks"] == ["cls_logits", "bbox_regression"]
        assert set(r["route_params"]) == {"cls_logits", "bbox_regression"}
        assert all(0 < n < r["model_params"] for n in r["route_params"].values())
        assert all(v == v for v in r["last_losses"].values())  # finite losses were recorded
