"""Mixed precision: bf16 autocast and fp16 with a GradScaler for every method (CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TwoHeadNet
from toydata import LOSSES, batches

import routesurgeon as rs
from routesurgeon import importance as imp
from routesurgeon.methods import registry
from routesurgeon.methods.base import GradientMethod

DRMGF_CFG = {"route_epochs": 1, "cycle_steps": 2, "s_batches": 1}


def _trainer(method: str, precision: str = "32", seed: int = 0, **kw: Any
             ) -> tuple[rs.Trainer, rs.Surgeon]:
    torch.manual_seed(seed)
    net = TwoHeadNet().train()
    s = rs.instrument(net, torch.randn(2, 3, 16, 16))
    opt = torch.optim.SGD(s.model_parameters(), lr=0.05)
    cfg = DRMGF_CFG if method == "drmgf" else None
    if precision == "fp16" and "scaler" not in kw:
        # the default 2**16 overflows this net's float16 weight gradients on the first steps
        # (the scaler would then halve it step by step): start where it trains
        kw["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return rs.Trainer(s, opt, method=method, config=cfg, precision=precision, progress=False,
                      **kw), s


def _params(s: rs.Surgeon) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*s.model.parameters(), *s.importance_bank.parameters()]]


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", rs.available_methods())
def test_every_method_trains_in_mixed_precision(method: str, precision: str) -> None:
    tr, s = _trainer(method, precision)
    before = _params(s)
    grads: list[torch.Tensor] = []
    data = batches(16, 8)
    if method == "drmgf":
        rec = tr.fit_epoch(data, LOSSES)
        assert all(torch.isfinite(torch.tensor(v)) for v in rec["losses"].values())
    else:
        x, y = data[0]
        with tr.autocast():
            outs = tr.task_outputs(tr.forward(x))
            losses = {t: LOSSES[t](outs[t], y[t]) for t in tr.surgeon.tasks}
        assert outs["a"].dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
        assert tr.backward(losses) is not None
        grads = [p.grad for p in s.model.parameters() if p.grad is not None]
        assert grads and _finite(grads)
        assert all(g.dtype == torch.float32 for g in grads)
        tr.optimizer_step()
    after = _params(s)
    assert _finite(after)
    assert tr.skipped == 0 and tr.overflow_skipped == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("method", ["equal", "drmgf-step", "pcgrad", "nash-mtl", "famo",
                                    "uncertainty"])
def test_fp16_gradient_is_unscaled(method: str) -> None:
    """The scaled backward leaves, after the scaler's unscale, the float32 gradient (to fp16
    rounding); the Taylor importance of drmgf-step is unscaled too."""
    x, y = batches(16, 8)[0]
    got = {}
    for prec in ("32", "fp16"):
        tr, s = _trainer(method, prec)
        with tr.autocast():
            outs = tr.task_outputs(tr.forward(x))
            losses = {t: LOSSES[t](outs[t], y[t]) for t in tr.surgeon.tasks}
        assert tr.backward(losses) is not None
        got[prec] = (torch.cat([p.grad.reshape(-1) for p in tr.optimizer_params()
                                if p.grad is not None]),
                     torch.cat([a.detach().reshape(-1) for a in s.importance_parameters()]))
        if prec == "fp16":
            assert tr.loss_scale == 2.0**10
    (g32, a32), (g16, a16) = got["32"], got["fp16"]
    assert F.cosine_similarity(g32, g16, dim=0) > 0.999
    assert abs(float(g16.norm() / g32.norm()) - 1) < 0.02
    assert torch.allclose(a16, a32, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("method", ["drmgf-step", "pcgrad", "drmgf"])
def test_fp16_overflow_is_the_scalers_business(method: str) -> None:
    """A scaled gradient that overflows float16: the scaler skips the step and halves its
    scale; the numerical guard counts nothing and never stops the run."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    tr, s = _trainer(method, "fp16", scaler=scaler, max_nonfinite=1)
    before = _params(s)
    data = batches(16, 8)
    if method == "drmgf":
        tr.fit_epoch(data[:1], LOSSES)  # one disentanglement step per task, one S step
        assert tr.overflow_skipped == len(tr.surgeon.tasks) + 1
    else:
        assert tr.train_step(*data[0], LOSSES) is None
        assert tr.overflow_skipped == 1
        assert all(torch.equal(a, b) for a, b in zip(before, _params(s)))
    assert tr.skipped == 0
    assert scaler.get_scale() == 2.0 ** (40 - tr.overflow_skipped)


def test_precision_api_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(rs.PrecisionError, match="unknown precision 'fp8'"):
        _trainer("equal", "fp8")
    with pytest.raises(rs.PrecisionError, match="loss scaling is for precision='fp16'"):
        _trainer("equal", "bf16", scaler=torch.amp.GradScaler("cpu"))
    _, s = _trainer("equal")
    tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), precision="16-mixed",
                    progress=False)  # Lightning's names; a GradScaler made with its defaults
    assert tr.precision.name == "fp16" and isinstance(tr.scaler, torch.amp.GradScaler)
    assert tr.loss_scale == 2.0**16
    assert _trainer("equal", "bf16-mixed")[0].scaler is None

    class Plain(GradientMethod):
        def backward(self, losses: Any) -> dict[str, float]:
            sum(losses.values()).backward()
            return {}

    monkeypatch.setitem(registry._METHODS, "plain-test", Plain)
    Plain.name = "plain-test"
    with pytest.raises(rs.PrecisionError, match=r"'plain-test' cannot train under "
                                                r"precision='fp16'.*supports_loss_scale"):
        _trainer("plain-test", "fp16")
    assert _trainer("plain-test", "bf16")[0].precision.name == "bf16"


def test_gated_forward_keeps_activation_path_under_autocast(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Under autocast drmgf's gated forward gates the activations (no gated weight copies) and
    computes what the gated-weight path computes, to bf16 rounding, outputs in bf16."""
    torch.manual_seed(0)
    net = TwoHeadNet().train()
    x = torch.randn(4, 3, 16, 16)
    s = rs.instrument(net, x, route_config=rs.RouteConfig(activation_gate_ratio=1e9))
    with torch.no_grad():
        for a in s.importance_parameters():
            a.uniform_(0.5, 2.0)
    calls = []
    real = imp._ActivationGated.apply

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    def run(weight_path: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        s.zero_grad(set_to_none=True)
        with monkeypatch.context() as m:
            m.setattr(imp._ActivationGated, "apply", counting)
            if weight_path:
                m.setattr(imp, "_has_hooks", lambda modules: True)
            with torch.autocast("cpu", dtype=torch.bfloat16), s.route("a"):
                out = s(x)
                loss = sum(F.mse_loss(v.float(), torch.ones_like(v.float())) for v in out.values())
        loss.backward()  # type: ignore[union-attr]
        params = [*s.model.parameters(), *s.importance_parameters()]
        return out, [p.grad.clone() for p in params if p.grad is not None]

    out_w, g_w = run(True)
    assert not calls
    out_a, g_a = run(False)
    assert calls  # the activation path ran under autocast
    for k in out_w:
        assert out_a[k].dtype == torch.bfloat16
        assert torch.allclose(out_a[k].float(), out_w[k].float(), rtol=0.05, atol=0.05)
    big = [i for i, g in enumerate(g_w) if g.norm() > 1e-3]  # not the ~0 grads before a BN
    assert len(big) > 10
    for i in big:
        assert F.cosine_similarity(g_a[i].reshape(-1), g_w[i].reshape(-1), dim=0) > 0.98
        assert g_a[i].dtype == torch.float32


def test_scaler_state_is_checkpointed(tmp_path: Any) -> None:
    tr, s = _trainer("drmgf-step", "fp16", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**40))
    tr.train_step(*batches(16, 8)[0], LOSSES)  # overflow: scale halved
    path = str(tmp_path / "run.ckpt")
    tr.save_checkpoint(path)
    opt = torch.optim.SGD(s.model_parameters(), lr=0.05)
    back = rs.Trainer.resume(path, s, opt, precision="fp16", progress=False)
    assert back.loss_scale == 2.0**39 and back.overflow_skipped == 0


@pytest.mark.parametrize("config", [{"mode": "depth", "per_task_from": 0.5},
                                    {"importance": "gated"}, {"mode": "branch"}])
def test_fp16_drmgf_step_modes_and_gated_importance(config: dict[str, Any]) -> None:
    """The gated importance learns A through its own scaled, then unscaled, gradient: A moves
    as in float32 (same direction, to fp16 rounding). Compared on ``dw``, the shared layer not
    followed by a BatchNorm (before a train-mode BN the gradient of A is rounding noise, and
    Adam's normalised steps follow its sign)."""
    moved = {}
    for prec in ("32", "fp16"):
        torch.manual_seed(0)
        s = rs.instrument(TwoHeadNet().train(), torch.randn(2, 3, 16, 16))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if prec == "fp16" else None
        tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.05), method="drmgf-step",
                        config=config, precision=prec, scaler=scaler, progress=False)
        dw = [a for k, a in s.importance_bank.A.items() if k.startswith("dw")]
        assert dw
        a0 = torch.cat([a.detach().reshape(-1).clone() for a in dw])
        for x, y in batches(16, 8):
            assert tr.train_step(x, y, LOSSES) is not None
        a1 = torch.cat([a.detach().reshape(-1) for a in dw])
        assert _finite([a1, *s.model.parameters()]) and tr.overflow_skipped == 0
        moved[prec] = a1 - a0
    if config.get("importance") == "gated" or config.get("mode") == "branch":
        assert moved["32"].abs().max() > 0
        assert F.cosine_similarity(moved["32"], moved["fp16"], dim=0) > 0.95
