"""The Lightning integration: a real ``lightning.Trainer`` drives routesurgeon methods.

A timm resnet18 with three linear heads (random weights, 16 px inputs) trained for 3 steps:

- in one process, with BatchNorm, it ends bit-identical to ``rs.Trainer.train_step`` on the same
  batches (``drmgf-step`` and ``pcgrad``; pcgrad draws a random projection order, so both runs
  start from the same RNG state and iterate the same ``DataLoader``);
- in two CPU processes (strategy ``ddp``, gloo), with GroupNorm instead of BatchNorm (train-mode
  BatchNorm normalises each rank's share by its own statistics, so it cannot equal one
  process), it equals one process on the global batch; the conflict monitor's sample there
  (per-task gradients averaged over the ranks) equals one process's too;
- modules without what routesurgeon needs are refused with messages naming what is missing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.errors import InputError, LossError
from routesurgeon.lightning import RouteSurgeonModule

TASKS = ["cls", "aux", "head2"]
SIZE, STEPS, BATCH = 16, 3, 4
LOSS_FNS = dict.fromkeys(TASKS, F.cross_entropy)


class GroupNorm8(nn.GroupNorm):
    def __init__(self, num_channels: int, **kw: Any) -> None:
        super().__init__(8, num_channels, **kw)


class Net(nn.Module):
    def __init__(self, norm: str = "bn") -> None:
        super().__init__()
        kw = {"norm_layer": GroupNorm8} if norm == "gn" else {}
        self.trunk = timm.create_model("resnet18", pretrained=False, num_classes=0, **kw)
        self.heads = nn.ModuleDict({t: nn.Linear(512, 5) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


class MultiTask(RouteSurgeonModule):
    """What a user writes: a LightningModule, with routesurgeon's base class."""

    def __init__(self, method: str, norm: str = "bn") -> None:
        super().__init__()
        self.routesurgeon_method = method
        self.net = Net(norm)
        self.example_input_array = torch.randn(2, 3, SIZE, SIZE)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        out = self(x)
        return {t: F.cross_entropy(out[t], y[:, i]) for i, t in enumerate(TASKS)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = STEPS * BATCH
    return torch.utils.data.TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g),
                                          torch.randint(0, 5, (n, 3), generator=g))


def _pl_trainer(**kw: Any) -> Any:
    return pl.Trainer(accelerator="cpu", max_steps=STEPS, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


def _fit(module: MultiTask, data: Any = None, batch: int = BATCH, **kw: Any) -> Any:
    trainer = _pl_trainer(devices=kw.pop("devices", 1), **kw)
    torch.manual_seed(7)
    trainer.fit(module, torch.utils.data.DataLoader(data or _dataset(), batch_size=batch))
    return trainer


def _rank_share(rank: int) -> torch.utils.data.TensorDataset:
    """This rank's half of every global batch, in order (``routesurgeon.distributed.shard``)."""
    from routesurgeon.distributed import shard

    x, y = _dataset().tensors
    parts = [shard((x[i:i + BATCH], y[i:i + BATCH]), rank, 2) for i in range(0, len(x), BATCH)]
    return torch.utils.data.TensorDataset(torch.cat([p[0] for p in parts]),
                                          torch.cat([p[1] for p in parts]))


def _state(module: MultiTask) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    bank = module.surgeon.importance_bank
    out.update({f"bank.{k}": v.detach().clone() for k, v in bank.state_dict().items()})
    return out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=atol, rtol=0), (
            k, float((a[k].double() - b[k].double()).abs().max()))


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("method", ["drmgf-step", "pcgrad"])
def test_lightning_trainer_equals_the_routesurgeon_trainer(method: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = MultiTask(method)
    module.routesurgeon_trainer_options = {"conflicts": 2}  # sample steps 0 and 2
    init = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _fit(module)
    tr = module.routesurgeon_trainer
    assert tr.method_name == method and tr.step_count == STEPS and trainer.global_step == STEPS
    assert set(trainer.callback_metrics) >= {f"train/loss/{t}" for t in TASKS}

    ref = MultiTask(method)
    ref.load_state_dict(init)
    s = rs.instrument(ref, ref.example_input_array)
    rt = rs.Trainer(s, torch.optim.SGD(ref.parameters(), lr=0.05), method=method, progress=False,
                    conflicts=2)
    torch.manual_seed(7)
    for x, y in torch.utils.data.DataLoader(_dataset(), batch_size=BATCH):
        last = rt.train_step(x, {t: y[:, i] for i, t in enumerate(TASKS)}, LOSS_FNS)
        assert last is not None
    got, want = _state(module), {f"model.{k}": v for k, v in ref.state_dict().items()}
    want.update({f"bank.{k}": v for k, v in s.importance_bank.state_dict().items()})
    _close(got, want, atol=1e-6)
    assert any(not torch.equal(got[f"model.{k}"], v) for k, v in init.items())  # it trained
    assert trainer.callback_metrics["train/loss/aux"].item() == pytest.approx(
        last["loss/aux"], abs=1e-6)
    # the conflict monitor sampled the same steps at the same weights, changing nothing
    got_c, want_c = tr.observer.samples, rt.observer.samples
    assert [c.step for c in got_c] == [c.step for c in want_c] == [0, 2]
    for a, b in zip(got_c, want_c, strict=True):
        assert torch.allclose(a.cosine, b.cosine, atol=1e-6, rtol=0, equal_nan=True)
    assert [len(h["conflicts"]) for h in tr.history] == [2]  # one epoch's record

    if method == "drmgf-step":  # Lightning checkpoints carry the importance variables
        assert module.surgeon.importance_bank.trained
        path = tmp_path / "run.ckpt"
        trainer.save_checkpoint(path)
        saved = torch.load(path, weights_only=False)["routesurgeon"]
        assert saved["method"] == "drmgf-step" and saved["step"] == STEPS
        for k, v in module.surgeon.importance_bank.state_dict().items():
            assert torch.equal(saved["bank"][k], v)


# -- two processes ---------------------------------------------------------------------------------
def _conflict_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = _dataset().tensors
    return x[:BATCH], {t: y[:BATCH, i] for i, t in enumerate(TASKS)}


def _ddp_worker(rank: int, tmp: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0",
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from routesurgeon.conflicts import ConflictConfig
    from routesurgeon.distributed import shard
    from routesurgeon.observe import ConflictMonitor

    out: dict[str, Any] = {}
    for method in ("drmgf-step", "pcgrad"):
        torch.manual_seed(1 + rank)  # different weights on each rank: rank 0's are broadcast
        module = MultiTask(method, norm="gn")
        # each rank reads its own share of every global batch (no DistributedSampler, which
        # would shuffle and interleave them)
        _fit(module, _rank_share(rank), batch=BATCH // 2, devices=2, strategy="ddp",
             use_distributed_sampler=False)
        out[method] = _state(module)
        out[f"{method}:steps"] = module.routesurgeon_trainer.step_count
    x, y = _conflict_batch()
    monitor = ConflictMonitor(module.surgeon, ConflictConfig(every=1))
    c = monitor.measure(shard(x), shard(y), LOSS_FNS, step=0, epoch=0)
    out["conflicts"] = (c.cosine, c.norm_ratio)
    torch.save(out, tmp / f"rank{rank}.pt")


def test_two_ddp_processes_equal_one_process(tmp_path: Path) -> None:
    ref: dict[str, Any] = {}
    for method in ("drmgf-step", "pcgrad"):
        torch.manual_seed(1)
        module = MultiTask(method, norm="gn")
        _fit(module)
        ref[method] = _state(module)
    x, y = _conflict_batch()
    ref_c = module.surgeon.conflicts([(x, y)], LOSS_FNS)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, tmp_path, port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for method in ("drmgf-step", "pcgrad"):
        assert r0[f"{method}:steps"] == r1[f"{method}:steps"] == STEPS
        for k, v in r0[method].items():  # the ranks agree bit for bit
            assert torch.equal(v, r1[method][k]), (method, k)
        _close(r0[method], ref[method], atol=1e-5)  # and equal one process on the global batch
    for got in (r0["conflicts"], r1["conflicts"]):
        for a, b in zip(got, (ref_c.cosine, ref_c.norm_ratio), strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0, equal_nan=True)


# -- bad input -------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 5) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.relu(self.body(x))
        return {t: h(z) for t, h in self.heads.items()}


class TinyTask(RouteSurgeonModule):
    returns = "dict"

    def __init__(self, method: str = "drmgf-step", example: bool = True) -> None:
        super().__init__()
        self.routesurgeon_method = method
        self.net = Tiny()
        if example:
            self.example_input_array = torch.randn(2, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        out = self.net(x) if self.returns == "bypass" else self(x)
        losses = {t: F.cross_entropy(out[t], y) for t in TASKS}
        if self.returns == "sum":
            return sum(losses.values())
        if self.returns == "missing":
            return {"losses": {t: v for t, v in losses.items() if t != "aux"}}
        return losses

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_tiny(module: TinyTask) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 5, (8,)))
    _pl_trainer(devices=1).fit(module, torch.utils.data.DataLoader(data, batch_size=4))


@pytest.mark.parametrize(("returns", "error", "words"), [
    ("sum", LossError, ["returned a Tensor (one loss)", "{task: loss}", "'cls'", "'head2'"]),
    ("missing", LossError, ["no loss for tasks ['aux']", "'cls'"]),
    ("bypass", InputError, ["without calling self(...)", "'drmgf-step'"]),
])
def test_modules_without_the_expected_outputs_are_told_what_is_missing(
        returns: str, error: type, words: list[str]) -> None:
    module = TinyTask()
    module.returns = returns
    with pytest.raises(error) as e:
        _fit_tiny(module)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_modules_routesurgeon_cannot_train_are_refused() -> None:
    with pytest.raises(InputError, match="has no example_input_array"):
        _fit_tiny(TinyTask(example=False))
    with pytest.raises(NotImplementedError, match="'drmgf' is a per-epoch algorithm"):
        _fit_tiny(TinyTask(method="drmgf"))
    module = TinyTask(method="equal")
    _fit_tiny(module)  # the plain summed loss trains through the same path
    assert module.routesurgeon_trainer.step_count == STEPS  # over two epochs of 2 batches
    with pytest.raises(InputError, match="built when training starts"):
        TinyTask().surgeon  # noqa: B018
