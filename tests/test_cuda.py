"""Devices: every path on a GPU (tests marked ``cuda``, skipped without one), and on the CPU the
device logic they rely on (the ``meta`` device, device propagation, a static check of the tensor
factories in the training and surgery modules, the tiny form of the GPU benchmark)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TwoHeadNet
from toydata import LOSSES, batches

import routesurgeon as rs
from routesurgeon import checkpoint as ckpt
from routesurgeon.report import measure_latency, route_report

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# -- CPU: the device logic -------------------------------------------------------------------------
def test_importance_variables_follow_the_model_device() -> None:
    """Every importance variable is created on its weight's device (here 'meta': nothing runs)."""
    net = TwoHeadNet().train().to("meta")
    s = rs.instrument(net, torch.empty(2, 3, 16, 16, device="meta"), verify=False)
    bank = list(s.importance_bank.named_parameters())
    assert bank and s.importance_bank.norm_names
    assert {p.device.type for _, p in bank} == {"meta"}, [
        n for n, p in bank if p.device.type != "meta"]
    gates = s.importance_bank.filter_gates("a")
    assert gates and {g.device.type for g in gates.values()} == {"meta"}


def test_precision_and_latency_name_the_device() -> None:
    net = TwoHeadNet().train().to("meta")
    s = rs.instrument(net, torch.empty(2, 3, 16, 16, device="meta"), verify=False)
    with pytest.raises(rs.PrecisionError, match="device 'meta'"):
        rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), precision="bf16")
    with pytest.raises(rs.InputError, match="clock='cpu' cannot time forwards on meta"):
        measure_latency({"m": nn_identity()}, [torch.empty(1, device="meta")], clock="cpu")
    torch.manual_seed(0)
    s = rs.instrument(TwoHeadNet().eval(), torch.randn(2, 3, 16, 16))
    routes = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])
    rows = route_report(s, routes, repeats=1, warmup=0)
    assert {r["device"] for r in rows} == {"cpu"}


def nn_identity() -> torch.nn.Module:
    return torch.nn.Identity()


def test_checkpoint_rng_state_has_a_gpu_slot_and_reads_old_checkpoints() -> None:
    state = ckpt.rng_state()
    assert state["cuda"] == ([] if not (CUDA and torch.cuda.is_initialized())
                             else torch.cuda.get_rng_state_all())
    torch.manual_seed(3)
    old = {k: v for k, v in ckpt.rng_state().items() if k != "cuda"}  # written before the slot
    a = torch.rand(3)
    ckpt.set_rng_state(old)
    assert torch.equal(torch.rand(3), a)


_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "rand", "randn", "randint",
              "eye", "linspace", "randperm", "as_tensor"}
# Tensors meant for the CPU, by module: (function, why)
_CPU_ON_PURPOSE = {
    ("importance.py", "filter_gates"),  # the index plan, moved to A's device once
    ("importance.py", "_activation_plan"),  # empty placeholder buffers, replaced per call
    ("trainer.py", "check_step_losses"),  # finiteness of a Python float
    ("precision.py", "*"), ("compile.py", "*"),
}
_CHECKED = ["importance.py", "trainer.py", "precision.py", "compile.py", "checkpoint.py",
            "saving.py", "export.py", "methods/drmgf.py", "methods/drmgf_step.py",
            "methods/baselines.py", "methods/base.py"]


def test_tensor_factories_in_training_and_surgery_code_pass_a_device() -> None:
    """A tensor made with ``torch.zeros(...)`` (etc.) lands on the CPU: in the modules that train,
    gate and export on the model's device, every such call passes ``device=`` (``*_like`` and
    ``new_*`` follow their argument) unless it is listed as CPU on purpose."""
    bad = []
    for rel in _CHECKED:
        path = ROOT / "routesurgeon" / rel
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.Lambda)]:
            name = getattr(fn, "name", "<lambda>")
            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
                f = call.func
                if not (isinstance(f, ast.Attribute) and f.attr in _FACTORIES
                        and isinstance(f.value, ast.Name) and f.value.id == "torch"):
                    continue
                if any(k.arg == "device" for k in call.keywords):
                    continue
                base = Path(rel).name
                if (base, name) in _CPU_ON_PURPOSE or (base, "*") in _CPU_ON_PURPOSE:
                    continue
                bad.append(f"{rel}:{call.lineno} torch.{f.attr} in {name}()")
    assert not bad, f"tensor factories without device=: {sorted(set(bad))}"


def test_gpu_bench_and_gpu_check_run_in_their_tiny_cpu_form(capsys: Any) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_step_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = gpu_step_bench.run(["--device", "cpu", "--tiny"])
    out = capsys.readouterr().out
    assert set(res["step_s"]) == {"equal", "drmgf-step", "pcgrad"}
    assert all(v > 0 for v in res["step_s"].values()) and res["drmgf_epoch_s"] > 0
    assert res["device"] == "cpu"
    for row in ("summed-loss step (equal)", "drmgf-step", "pcgrad", "drmgf epoch, per batch"):
        assert re.search(rf"{re.escape(row)}\s+[\d.]+\s+[\d.]+", out), out
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert "-m cuda tests/test_cuda.py" in script and "gpu_step_bench.py" in script


# -- GPU: every path on cuda -----------------------------------------------------------------------
def _cuda_surgeon(**kw: Any) -> rs.Surgeon:
    torch.manual_seed(0)
    net = TwoHeadNet().train().cuda()
    return rs.instrument(net, torch.randn(2, 3, 16, 16, device="cuda"), **kw)


def _cuda_batches(n: int = 32) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    return [(x.cuda(), {k: v.cuda() for k, v in y.items()}) for x, y in batches(n, 8)]


class DropNet(TwoHeadNet):
    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return super().forward(self.drop(x))


@pytest.mark.cuda
@needs_cuda
def test_cuda_instrument_verifies_train_mode_with_dropout() -> None:
    torch.manual_seed(0)
    s = rs.instrument(DropNet().train().cuda(), torch.randn(2, 3, 16, 16, device="cuda"))
    assert {p.device.type for p in s.importance_bank.parameters()} == {"cuda"}


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])
@pytest.mark.parametrize("method", rs.available_methods())
def test_cuda_every_method_trains(method: str, precision: str) -> None:
    s = _cuda_surgeon()
    opt = torch.optim.SGD(s.model_parameters(), lr=0.05)
    cfg = {"route_epochs": 1, "cycle_steps": 2, "s_batches": 1} if method == "drmgf" else None
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if precision == "fp16" else None
    tr = rs.Trainer(s, opt, method=method, config=cfg, precision=precision, scaler=scaler,
                    progress=False)
    before = [p.detach().clone() for p in s.model.parameters()]
    rec = tr.fit_epoch(_cuda_batches(), LOSSES)
    assert rec["losses"] and tr.skipped == 0
    after = list(s.model.parameters())
    assert all(p.device.type == "cuda" and bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.device.type == "cuda" for p in s.importance_bank.parameters())


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["drmgf-step", "drmgf"])
def test_cuda_checkpoint_resume_continues_exactly(method: str, tmp_path: Path) -> None:
    data = _cuda_batches()
    cfg = {"route_epochs": 1, "cycle_steps": 2, "s_batches": 1} if method == "drmgf" else None

    def make() -> tuple[rs.Trainer, rs.Surgeon]:
        s = _cuda_surgeon()
        opt = torch.optim.SGD(s.model_parameters(), lr=0.05)
        return rs.Trainer(s, opt, method=method, config=cfg, progress=False), s

    full, s_full = make()
    full.fit_epoch(data, LOSSES)
    full.fit_epoch(data, LOSSES)
    part, _ = make()
    path = str(tmp_path / "run.ckpt")
    part.fit_epoch(data, LOSSES, checkpoint=path)
    s2 = _cuda_surgeon()
    back = rs.Trainer.resume(path, s2, torch.optim.SGD(s2.model_parameters(), lr=0.05),
                             config=cfg, progress=False)
    back.fit_epoch(data, LOSSES)
    for a, b in zip(s_full.model.parameters(), s2.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_cuda_export_save_load_and_report(tmp_path: Path) -> None:
    s = _cuda_surgeon()
    tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.05), progress=False)
    tr.fit_epoch(_cuda_batches(), LOSSES)
    s.eval()
    routes = s.export_routes(keep=0.5)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    assert routes["a"](x).device.type == "cuda"
    rows = route_report(s, routes, repeats=2, warmup=1)
    assert all(r["device"].startswith("cuda:") for r in rows)
    saved = rs.save_routes(routes, tmp_path, surgeon=s, formats=("pt", "pt2", "onnx"))
    for name in saved:
        on_gpu = rs.load_route(tmp_path, name, format="pt")
        on_cpu = rs.load_route(tmp_path, name, format="pt", device="cpu")
        assert next(on_cpu.parameters()).device.type == "cpu"
        torch.testing.assert_close(on_cpu(x.cpu()), on_gpu(x).cpu(), rtol=1e-4, atol=1e-5)
        rs.load_route(tmp_path, name, format="pt2", device="cpu")
    html = s.report(tmp_path / "report.html", history=tr, routes=routes)
    assert Path(html).is_file()


@pytest.mark.cuda
@needs_cuda
def test_cuda_compiled_drmgf_step_equals_eager() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    data = _cuda_batches(24)
    states = []
    for comp in (False, True):
        torch._dynamo.reset()
        s = _cuda_surgeon()
        tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.05), progress=False,
                        compile=comp)
        for x, y in data:
            assert tr.train_step(x, y, LOSSES) is not None
        states.append([p.detach().clone() for p in s.model.parameters()])
    for a, b in zip(*states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_cuda_gated_forward_under_autocast_takes_the_activation_path() -> None:
    s = _cuda_surgeon(route_config=rs.RouteConfig(activation_gate_ratio=1e9))
    x = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), s.route("a"):
        out = s(x)
        loss = sum(F.mse_loss(v.float(), torch.zeros_like(v.float())) for v in out.values())
    loss.backward()  # type: ignore[union-attr]
    assert out["a"].dtype == torch.bfloat16
    grads = [p.grad for p in s.importance_parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) and g.dtype == torch.float32
                         for g in grads)
