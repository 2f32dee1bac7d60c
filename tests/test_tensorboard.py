"""TensorBoard logging from the ``Trainer`` (``log_dir=``), read back with EventAccumulator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import routesurgeon as rs
from routesurgeon.tensorboard import cosine_image
from tests.conflictnet import LOSSES, batches, surgeon


def _metric(out: torch.Tensor, y: torch.Tensor) -> float:
    return float(out.argmax(1).eq(y).float().mean()) if out.shape[1] > 1 else float(
        (out.squeeze(1) - y).abs().mean())


def _events(path: Path) -> EventAccumulator:
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    ea.Reload()
    return ea


def test_trainer_writes_losses_metrics_importance_routes_and_conflicts(tmp_path: Path) -> None:
    s = surgeon(3)
    data = batches(3, seed=5)
    tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.05), method="drmgf-step",
                    log_dir=str(tmp_path / "tb"), progress=False)
    assert tr.observer.monitor is not None  # log_dir turns the conflict monitor on
    assert tr.observer.monitor.every == rs.conflicts.default_every(3) == 100
    for _ in range(2):
        tr.fit_epoch(data, LOSSES)
        tr.evaluate(data[:1], dict.fromkeys(s.tasks, _metric))
    tr.observer.close()
    ea = _events(tmp_path / "tb")
    tags = ea.Tags()
    for t in s.tasks:
        steps = [e.step for e in ea.Scalars(f"train/loss/{t}")]
        assert steps == list(range(1, 7))  # 2 epochs x 3 steps, logged after each step
        assert [e.value for e in ea.Scalars(f"epoch/loss/{t}")] == pytest.approx(
            [h["losses"][t] for h in tr.history], rel=1e-6)
        assert [e.value for e in ea.Scalars(f"metric/{t}")] == pytest.approx(
            [h["metrics"][t]["metric"] for h in tr.history], rel=1e-6)
        frac = [e.value for e in ea.Scalars(f"route/{t}/kept_fraction")]
        assert len(frac) == 2 and all(0 < f <= 1 for f in frac)
        mask = s.route_masks(t, keep=None, threshold=1 / 3, scores="importance")
        assert frac[-1] == pytest.approx(mask.kept_fraction, rel=1e-6)
    # importance histograms: one per shared conv/linear layer and task, per epoch
    imp = s.importance()
    want = {f"importance/{layer}/{t}" for layer, per in imp.items() for t in per}
    assert want and want <= set(tags["histograms"])
    h = ea.Histograms("importance/c1/a")
    assert [e.step for e in h] == [0, 1]
    assert h[-1].histogram_value.num == imp["c1"]["a"].numel()
    assert h[-1].histogram_value.sum == pytest.approx(float(imp["c1"]["a"].sum()), rel=1e-5)
    # conflicts: the first sample (step 0) as scalars, histograms and a picture
    sample = tr.history[0]["conflicts"][0]
    assert sample["step"] == 0
    got = ea.Scalars("conflict/a|b/mean_cosine")
    vals = [v for row in sample["cosine"] for v in [row[0]] if v is not None]
    assert [e.step for e in got] == [0] and got[0].value == pytest.approx(
        sum(vals) / len(vals), rel=1e-5)
    assert {"conflict/a|c/negative_fraction", "conflict/b|c/min_cosine"} <= set(tags["scalars"])
    assert "conflict/a|b/cosine" in tags["histograms"]
    img = ea.Images("conflict/cosine_map")[0]
    assert (img.width, img.height) == (6 * len(sample["layers"]), 6 * len(sample["pairs"]))
    assert {"epoch/time", "epoch/skipped"} <= set(tags["scalars"])


def test_cosine_image_colours() -> None:
    cos = torch.tensor([[-1.0, 0.0], [1.0, math.nan]], dtype=torch.float64)  # 2 layers x 2 pairs
    img = cosine_image(cos, cell=2)
    assert img.shape == (3, 4, 4) and img.dtype == np.uint8
    px = img[:, ::2, ::2].transpose(1, 2, 0)  # pairs x layers x rgb
    assert tuple(px[0, 0]) == (215, 48, 39)  # layer 0, pair 0: opposing -> red
    assert tuple(px[0, 1]) == (33, 102, 172)  # layer 1, pair 0: aligned -> blue
    assert tuple(px[1, 0]) == (247, 247, 247)  # orthogonal -> white
    assert tuple(px[1, 1]) == (190, 190, 190)  # undefined -> grey
