"""Every registered method trains real multi-output models end to end on package-shipped data.

Data: scikit-learn's bundled 8x8 digits, upsampled to 32x32 RGB. Models: a timm resnet18 with three
linear heads, an smp Unet with an aux classification head, a multi-exit resnet18. Each (model,
method) pair trains two epochs of a few batches; the summed task loss must go down, and for the
DR-MGF methods the learned route scores must differ between tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import routesurgeon as rs

BATCH, N_BATCHES, SIZE = 8, 2, 32


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[: BATCH * N_BATCHES], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x.repeat(1, 3, 1, 1), torch.tensor(d.target[: BATCH * N_BATCHES])


def _resnet_heads() -> tuple[rs.Surgeon, dict[str, Any], dict[str, Callable[..., Any]]]:
    b = rs.build_model("timm:resnet18", input_size=SIZE)
    s = rs.instrument(b.model.train(), b.example_inputs, tasks=b.tasks)
    _, y = _digits()
    targets = {"cls": y, "aux": y % 2, "head2": (y >= 5).long()}  # digit, parity, high/low
    assert set(targets) == set(s.tasks)
    return s, targets, dict.fromkeys(s.tasks, F.cross_entropy)


def _unet_aux() -> tuple[rs.Surgeon, dict[str, Any], dict[str, Callable[..., Any]]]:
    b = rs.build_model("smp:Unet:resnet18", aux_classes=10, num_classes=2, input_size=SIZE,
                       encoder_depth=3, decoder_channels=(32, 16, 8))
    s = rs.instrument(b.model.train(), b.example_inputs, tasks=b.tasks)
    x, y = _digits()
    targets = {"mask": (x[:, 0] > 0.3).long(), "label": y}  # foreground mask, digit
    return s, targets, dict.fromkeys(s.tasks, F.cross_entropy)


def _multi_exit() -> tuple[rs.Surgeon, dict[str, Any], dict[str, Callable[..., Any]]]:
    import timm

    model = rs.multi_exit(timm.create_model("resnet18", pretrained=False, num_classes=10),
                          stages=[2, 3, 4])
    s = rs.instrument(model.train(), torch.randn(2, 3, SIZE, SIZE))
    _, y = _digits()
    targets = dict.fromkeys(s.tasks, y)
    return s, targets, dict.fromkeys(s.tasks, F.cross_entropy)


MODELS = {"resnet18-heads": _resnet_heads, "unet-aux": _unet_aux, "multi-exit": _multi_exit}


def _loader(targets: dict[str, Any]) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    x, _ = _digits()
    return [(x[i * BATCH:(i + 1) * BATCH], {t: v[i * BATCH:(i + 1) * BATCH]
                                           for t, v in targets.items()})
            for i in range(N_BATCHES)]


@torch.no_grad()
def _total_loss(s: rs.Surgeon, targets: dict[str, Any], loss_fns: dict[str, Any]) -> float:
    x, _ = _digits()
    s.train()  # batch statistics: a few steps are too few for BN running statistics
    out = s(x)
    tr_outs = rs.Trainer.task_outputs(type("T", (), {"surgeon": s})(), out)  # type: ignore[arg-type]
    return float(sum(loss_fns[t](tr_outs[t], targets[t]) for t in s.tasks))


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("method", rs.available_methods())
def test_every_method_trains_every_model(model: str, method: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    s, targets, loss_fns = MODELS[model]()
    before = _total_loss(s, targets, loss_fns)
    opt = torch.optim.Adam(s.model_parameters(), lr=2e-3)
    config = {"epochs": 2, "route_epochs": 2} if method == "drmgf" else {}
    tr = rs.Trainer(s, opt, method=method, config=config, progress=False)
    for _ in range(2):
        rec = tr.fit_epoch(_loader(targets), loss_fns)
        assert rec["skipped"] == 0
    after = _total_loss(s, targets, loss_fns)
    assert after < before, f"{method} on {model}: loss {before:.3f} -> {after:.3f}"
    if method in ("drmgf", "drmgf-step"):
        assert s.importance_bank.trained
        spread = max(float((torch.stack(list(per.values())).amax(0)
                            - torch.stack(list(per.values())).amin(0)).max())
                     for per in s.importance().values())
        assert spread > 1e-3, f"{method} on {model}: route scores equal across tasks"
