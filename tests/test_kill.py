"""Kill tests: a training run SIGKILLed at random points resumes exactly, checkpoints stay whole.

Each run is a child process forked from a forkserver that preloaded torch (fast, and fork-safe); it
trains a tiny model with a checkpoint after every step and logs every step's losses. The parent
kills it with SIGKILL after a random delay, checks that the checkpoint on disk is whole, and starts
the next child, which resumes from it. Every loss ever logged for a step must equal the
uninterrupted run's loss for that step.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import routesurgeon as rs
from routesurgeon import checkpoint as ckpt
from routesurgeon.trainer import Trainer

EPOCHS = 64  # 256 steps: 20 kills must all land before the run ends, on a fast machine too
KILLS = 20


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.ha = nn.Linear(4, 3)
        self.hb = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.drop(F.relu(self.bn(self.c1(x))).mean((2, 3)))
        return {"a": self.ha(z), "b": self.hb(z)}


LOSSES = {"a": F.cross_entropy, "b": lambda o, y: F.mse_loss(o.squeeze(1), y)}


def _collate(items: list) -> tuple:
    return (torch.stack([i[0] for i in items]),
            {"a": torch.stack([i[1] for i in items]), "b": torch.stack([i[2] for i in items])})


def _surgeon() -> rs.Surgeon:
    """Instrumented once in the parent; every forked child starts from a copy of it."""
    torch.manual_seed(0)
    return rs.instrument(Tiny().train(), torch.randn(2, 3, 5, 5))


def _child(ckpt_path: str, log_path: str) -> None:
    """Train (resuming if a checkpoint exists), logging ``step loss_a loss_b`` per step."""
    torch.set_num_threads(1)
    s = _surgeon()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, 5, 5, generator=g)
    ds = TensorDataset(x, (x[:, 0].mean((1, 2)) > 0).long(), x[:, 1].mean((1, 2)))
    loader = DataLoader(ds, batch_size=5, shuffle=True, collate_fn=_collate)
    opt = torch.optim.Adam(s.model_parameters(), lr=1e-2)
    with open(log_path, "a") as log:
        if os.path.exists(ckpt_path):
            tr = Trainer.resume(ckpt_path, s, opt, progress=False)
            log.write(f"resume {tr.step_count}\n")
        else:
            tr = Trainer(s, opt, method="drmgf-step", progress=False)
            log.write("start 0\n")
        log.flush()

        def on_step(step: int, stats: dict[str, float]) -> None:
            log.write(f"{step} {stats['loss/a']!r} {stats['loss/b']!r}\n")
            log.flush()

        while tr.epoch < EPOCHS:
            tr.fit_epoch(loader, LOSSES, checkpoint=ckpt_path, checkpoint_every=1,
                         on_step=on_step)
        log.write("done\n")


def _parse(log: Path) -> tuple[list[tuple[str, int]], dict[int, list[tuple[float, float]]]]:
    events: list[tuple[str, int]] = []
    losses: dict[int, list[tuple[float, float]]] = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:  # "start 0", "resume k", "done", or a line cut by the kill
            if parts and parts[0] in ("start", "resume", "done"):
                events.append((parts[0], int(parts[1]) if len(parts) > 1 else -1))
            continue
        losses.setdefault(int(parts[0]), []).append((float(parts[1]), float(parts[2])))
    return events, losses


def _steps_logged(log: Path) -> int:
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if len(line.split()) == 3)


def test_sigkill_at_random_points_always_resumes_exactly(tmp_path: Path) -> None:
    # forkserver: children fork from a clean server that imported torch but never started
    # OpenMP threads (a plain fork of a pytest worker that already ran torch is not fork-safe)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "routesurgeon"])
    ref_log = tmp_path / "ref.log"
    p = ctx.Process(target=_child, args=(str(tmp_path / "ref.ckpt"), str(ref_log)))
    p.start()
    p.join(120)
    assert p.exitcode == 0, (p.exitcode, ref_log.read_text()[-300:] if ref_log.exists() else "")
    _, ref = _parse(ref_log)
    n_steps = EPOCHS * 4
    assert sorted(ref) == list(range(1, n_steps + 1))

    path, log = tmp_path / "run.ckpt", tmp_path / "run.log"
    rng = random.Random(0)
    expected_resume = []  # the step of the checkpoint each new child must resume from
    for _ in range(KILLS):
        expected_resume.append(ckpt.read_header(path).step if path.exists() else None)
        p = ctx.Process(target=_child, args=(str(path), str(log)))
        p.start()
        # a random point: after 1-3 more logged steps, then a random part of a step (forward,
        # backward, optimizer or the checkpoint write)
        target = _steps_logged(log) + rng.randint(1, 3)
        deadline = time.monotonic() + 60
        while _steps_logged(log) < target and p.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        assert p.is_alive(), ("the child ended before the kill", p.exitcode,
                              log.read_text()[-500:])
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        # killed while training, never finished nor crashed
        assert p.exitcode == -signal.SIGKILL, (p.exitcode, log.read_text()[-300:])
        if path.exists():  # never half-written: the whole file verifies
            header = ckpt.read_header(path)
            assert 0 < header.step <= n_steps
    expected_resume.append(ckpt.read_header(path).step if path.exists() else None)
    p = ctx.Process(target=_child, args=(str(path), str(log)))  # let the last one finish
    p.start()
    p.join(120)
    assert p.exitcode == 0

    events, seen = _parse(log)
    starts = [e for e in events if e[0] in ("start", "resume")]
    assert len(starts) == KILLS + 1
    for (kind, step), want in zip(starts, expected_resume):
        assert (kind, step) == (("start", 0) if want is None else ("resume", want))
    assert all(k == "resume" and s > 0 for k, s in starts[1:])  # every kill hit training
    assert events[-1] == ("done", -1)
    assert sorted(seen) == list(range(1, n_steps + 1))
    for step, values in seen.items():
        for a, b in values:
            assert abs(a - ref[step][0][0]) <= 1e-6 and abs(b - ref[step][0][1]) <= 1e-6, step
