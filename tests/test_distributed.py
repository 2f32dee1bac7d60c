"""Data-parallel training: 2 CPU processes (gloo) equal 1 process on the same global batch.

The model has no BatchNorm: with BN in train mode each rank normalises by its own share of the
batch, which is not the global batch (use SyncBatchNorm before instrumenting, or eval-mode BN).
Ranks start from *different* random weights: the Trainer's broadcast from rank 0 must fix that.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.distributed import shard
from routesurgeon.trainer import Trainer

WORLD = 2
LR = 1e-2


class NoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.ha = nn.Linear(6, 3)
        self.hb = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3))
        return {"a": self.ha(z), "b": self.hb(z)}


LOSSES = {"a": F.cross_entropy, "b": lambda o, y: F.mse_loss(o.squeeze(1), y)}


def _batches(n: int = 4, size: int = 8) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        x = torch.randn(size, 3, 6, 6, generator=g)
        out.append((x, {"a": (x[:, 0].mean((1, 2)) > 0).long(), "b": x[:, 1].mean((1, 2))}))
    return out


def _trainer(method: str, seed: int) -> Trainer:
    torch.manual_seed(seed)
    s = rs.instrument(NoBN().train(), torch.randn(2, 3, 6, 6))
    config = {"cycle_steps": 2, "s_batches": 1} if method == "drmgf" else {}
    return Trainer(s, torch.optim.Adam(s.model_parameters(), lr=LR), method=method,
                   config=config, progress=False)


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in tr.surgeon.model.state_dict().items()}
    out.update({f"bank.{k}": v.detach().clone()
                for k, v in tr.surgeon.importance_bank.state_dict().items()})
    return out


def _run(tr: Trainer, batches: list[Any], steps: int) -> list[float]:
    losses = []
    for x, y in batches[:steps]:
        stats = tr.train_step(x, y, LOSSES)
        assert stats is not None
        losses.append(stats["loss/a"] + stats["loss/b"])
    return losses


def _next_loss(tr: Trainer, batch: Any) -> float:
    stats = tr.train_step(batch[0], batch[1], LOSSES)
    assert stats is not None
    return stats["loss/a"] + stats["loss/b"]


def _worker(rank: int, tmp: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'pg'}", rank=rank,
                            world_size=WORLD)
    try:
        mine = [shard(b) for b in _batches()]
        out: dict[str, Any] = {}
        tr = _trainer("drmgf-step", seed=10 + rank)  # different weights: broadcast fixes them
        out["step_losses"] = _run(tr, mine, 3)
        out["step_state"] = _state(tr)
        tr.save_checkpoint(str(tmp / "from2.ckpt"))  # rank 0 writes, everyone waits
        out["next_loss"] = _next_loss(tr, mine[3])
        tr = _trainer("drmgf", seed=20 + rank)
        tr.fit_epoch(mine, LOSSES)  # 2 cycles of 2 batches: 2 fusion stages
        out["drmgf_state"] = _state(tr)
        tr = _trainer("drmgf-step", seed=30 + rank)
        tr.load_checkpoint(str(tmp / "from1.ckpt"))  # written by one process
        out["resumed_next_loss"] = _next_loss(tr, mine[3])
        out["bytes"] = tr.comm.bytes
        torch.save(out, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (what, k, (a[k] - b[k]).abs().max())


def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    batches = _batches()
    ref = _trainer("drmgf-step", seed=10)
    ref_losses = _run(ref, batches, 3)
    ref_state = _state(ref)
    ref.save_checkpoint(str(tmp_path / "from1.ckpt"))
    ref_next = _next_loss(ref, batches[3])
    ref_drmgf = _trainer("drmgf", seed=20)
    ref_drmgf.fit_epoch(batches, LOSSES)

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(r, tmp_path)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * WORLD
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))

    # identical across ranks (bit for bit: every rank applies the same averaged update)
    for key in ("step_state", "drmgf_state"):
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    # and equal to one process over the same global batch
    assert r0["step_losses"] == pytest.approx(ref_losses, abs=1e-5)
    _close(r0["step_state"], ref_state, "drmgf-step")
    _close(r0["drmgf_state"], _state(ref_drmgf), "drmgf")
    # the importance variables moved (Taylor updates, synchronised) and S moved (fusion stages)
    init = _state(_trainer("drmgf-step", seed=10))
    assert any(not torch.allclose(v, init[k]) for k, v in r0["step_state"].items()
               if k.startswith("bank.A"))
    assert any(not torch.allclose(v, init[k]) for k, v in r0["drmgf_state"].items()
               if k.startswith("bank.S"))

    # checkpoints across world sizes: 2 -> 1 and 1 -> 2 give the same next loss
    one = _trainer("drmgf-step", seed=40)
    one.load_checkpoint(str(tmp_path / "from2.ckpt"))
    assert rs.checkpoint.read_header(tmp_path / "from2.ckpt").world_size == WORLD
    assert _next_loss(one, batches[3]) == pytest.approx(ref_next, abs=1e-5)
    assert r0["next_loss"] == pytest.approx(ref_next, abs=1e-5)
    assert r0["resumed_next_loss"] == pytest.approx(ref_next, abs=1e-5)
    assert r1["resumed_next_loss"] == r0["resumed_next_loss"]
    assert r0["bytes"] > 0


def _refusal_worker(rank: int, tmp: Path) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'pg'}", rank=rank,
                            world_size=WORLD)
    msgs = []
    try:
        for method, config in (("pcgrad", {}), ("drmgf-step", {"importance": "gated"})):
            try:
                torch.manual_seed(0)
                s = rs.instrument(NoBN().train(), torch.randn(2, 3, 6, 6))
                Trainer(s, torch.optim.SGD(s.model_parameters(), lr=LR), method=method,
                        config=config, progress=False)
            except NotImplementedError as e:
                msgs.append(str(e))
        (tmp / f"msg{rank}").write_text("\n".join(msgs))
    finally:
        dist.destroy_process_group()


def test_unsynchronisable_methods_are_refused_under_a_process_group(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_refusal_worker, args=(r, tmp_path)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * WORLD
    for r in range(WORLD):
        pcgrad, gated = (tmp_path / f"msg{r}").read_text().split("\n")
        assert "'pcgrad' under torch.distributed" in pcgrad and "drmgf-step" in pcgrad
        assert "gated importance under torch.distributed" in gated
