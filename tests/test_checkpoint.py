"""Checkpoints: exact resume (also mid-epoch), atomic writes, refusal of foreign/corrupt files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import routesurgeon as rs
from routesurgeon import checkpoint as ckpt
from routesurgeon.trainer import Trainer


class Tiny(nn.Module):
    """A shared conv trunk (with BN and dropout: state and RNG matter) and two heads."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.ha = nn.Linear(c, 3)
        self.hb = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        z = self.drop(y.mean((2, 3)))
        return {"a": self.ha(z), "b": self.hb(z)}


LOSSES = {"a": F.cross_entropy, "b": lambda o, y: F.mse_loss(o.squeeze(1), y)}


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, 6, 6, generator=g)
    ds = TensorDataset(x, (x[:, 0].mean((1, 2)) > 0).long(), x[:, 1].mean((1, 2)))
    return DataLoader(ds, batch_size=6, shuffle=True,  # shuffled by the global torch RNG
                      collate_fn=lambda b: (torch.stack([i[0] for i in b]),
                                            {"a": torch.stack([i[1] for i in b]),
                                             "b": torch.stack([i[2] for i in b])}))


CONFIGS = {"drmgf": {"cycle_steps": 2, "s_batches": 1}, "drmgf-step-gated": {"importance": "gated"}}


def _trainer(method: str, seed: int = 0, c: int = 4) -> Trainer:
    torch.manual_seed(seed)
    s = rs.instrument(Tiny(c).train(), torch.randn(2, 3, 6, 6))
    opt = torch.optim.Adam(s.model_parameters(), lr=1e-2)
    config = CONFIGS.get(method, {})
    method = method.removesuffix("-gated")
    return Trainer(s, opt, method=method, config=config, progress=False)


class Crash(Exception):
    pass


def _run(tr: Trainer, epochs: int, path: Path | None = None, every: int | None = None,
         crash_at: int | None = None) -> dict[int, dict[str, float]]:
    log: dict[int, dict[str, float]] = {}

    def on_step(step: int, stats: dict[str, float]) -> None:
        log[step] = {t: stats[f"loss/{t}"] for t in tr.surgeon.tasks}
        if step == crash_at:
            raise Crash

    loader = _loader()
    while tr.epoch < epochs:
        tr.fit_epoch(loader, LOSSES, checkpoint=None if path is None else str(path),
                     checkpoint_every=every, on_step=on_step)
    return log


@pytest.mark.parametrize("method", ["drmgf-step", "drmgf-step-gated", "famo", "uncertainty"])
def test_mid_epoch_resume_continues_exactly(method: str, tmp_path: Path) -> None:
    ref_tr = _trainer(method)
    ref = _run(ref_tr, 3)
    path = tmp_path / "run.ckpt"
    tr = _trainer(method)
    with pytest.raises(Crash):
        _run(tr, 3, path, every=2, crash_at=7)  # 4 batches an epoch: dies in epoch 2
    header = ckpt.read_header(path)
    assert (header.step, header.epoch, header.method) == (6, 1, method.removesuffix("-gated"))
    s = _trainer(method, seed=5).surgeon  # other initial weights: all must come from the file
    resumed = Trainer.resume(str(path), s, torch.optim.Adam(s.model_parameters(), lr=1e-2),
                             config=CONFIGS.get(method), progress=False)
    assert resumed.step_count == 6 and resumed.epoch == 1
    log = _run(resumed, 3)
    assert sorted(log) == list(range(7, 13))
    for step, losses in log.items():
        for t, v in losses.items():
            assert abs(v - ref[step][t]) <= 1e-6, (step, t, v, ref[step][t])
    for (n, p), q in zip(ref_tr.surgeon.model.state_dict().items(),
                         resumed.surgeon.model.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-6), n
    for p, q in zip(ref_tr.surgeon.importance_bank.parameters(),
                    resumed.surgeon.importance_bank.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    flat = [v for r in resumed.history for v in r["losses"].values()]
    assert flat == pytest.approx([v for r in ref_tr.history for v in r["losses"].values()],
                                 abs=1e-6)
    assert [r["steps"] for r in resumed.history] == [4, 4, 4]


def test_per_epoch_drmgf_resumes_at_epoch_boundary(tmp_path: Path) -> None:
    ref_tr = _trainer("drmgf")
    _run(ref_tr, 2)
    path = tmp_path / "drmgf.ckpt"
    tr = _trainer("drmgf")
    _run(tr, 1, path)
    s = _trainer("drmgf", seed=3).surgeon
    resumed = Trainer.resume(str(path), s, torch.optim.Adam(s.model_parameters(), lr=1e-2),
                             config={"cycle_steps": 2, "s_batches": 1}, progress=False)
    _run(resumed, 2)
    assert resumed.history[-1]["losses"] == pytest.approx(ref_tr.history[-1]["losses"],
                                                          abs=1e-6)
    for p, q in zip(ref_tr.surgeon.model.parameters(), s.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    for p, q in zip(ref_tr.surgeon.scale_parameters(), s.scale_parameters()):
        assert torch.allclose(p, q, atol=1e-6)  # the S optimizer's moments were restored


def _saved(tmp_path: Path, method: str = "drmgf-step") -> tuple[Trainer, Path]:
    tr = _trainer(method)
    _run(tr, 1)
    path = tmp_path / "ok.ckpt"
    tr.save_checkpoint(str(path))
    return tr, path


def _state(tr: Trainer) -> list[torch.Tensor]:
    return [t.clone() for t in [*tr.surgeon.model.state_dict().values(),
                                *tr.surgeon.importance_bank.parameters()]]


def _assert_untouched(tr: Trainer, before: list[torch.Tensor]) -> None:
    for a, b in zip(before, _state(tr)):
        assert torch.equal(a, b)
    assert tr.step_count == 0 and tr.epoch == 0


def test_refuses_another_model_method_tasks_and_version(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = _saved(tmp_path)
    other = _trainer("drmgf-step", c=5)
    before = _state(other)
    differ = r"another model: \d+ parameters/buffers differ \(0:bn\.bias: \(4,\) in the file"
    with pytest.raises(rs.CheckpointError, match=differ + r", \(5,\) here"):
        other.load_checkpoint(str(path))
    _assert_untouched(other, before)
    famo = _trainer("famo")
    with pytest.raises(rs.CheckpointError, match=r"method 'drmgf-step'.*runs 'famo'"):
        famo.load_checkpoint(str(path))
    s = rs.instrument(Tiny().train(), torch.randn(2, 3, 6, 6), tasks={"x": "a", "y": "b"})
    renamed = Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), progress=False)
    with pytest.raises(rs.CheckpointError, match=r"tasks \['a', 'b'\].*\['x', 'y'\]"):
        renamed.load_checkpoint(str(path))
    monkeypatch.setattr(ckpt, "__version__", "9.9.9")
    same = _trainer("drmgf-step")
    before = _state(same)
    with pytest.raises(rs.CheckpointError, match=r"routesurgeon 0\.1\.0, this is 9\.9\.9"):
        same.load_checkpoint(str(path))
    _assert_untouched(same, before)


def test_refuses_corrupt_truncated_and_foreign_files(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    raw = path.read_bytes()
    tr = _trainer("drmgf-step")
    before = _state(tr)
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(raw[:-100] + bytes([raw[-100] ^ 0xFF]) + raw[-99:])
    with pytest.raises(rs.CheckpointError, match=r"corrupt: payload SHA-256"):
        tr.load_checkpoint(str(flipped))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(rs.CheckpointError, match=r"truncated: payload has \d+ of \d+ bytes"):
        tr.load_checkpoint(str(cut))
    head = tmp_path / "head.ckpt"
    head.write_bytes(raw[:40])
    with pytest.raises(rs.CheckpointError, match=r"corrupt header"):
        tr.load_checkpoint(str(head))
    foreign = tmp_path / "model.pt"
    torch.save(tr.surgeon.model.state_dict(), foreign)
    with pytest.raises(rs.CheckpointError, match=r"not a routesurgeon checkpoint"):
        tr.load_checkpoint(str(foreign))
    with pytest.raises(rs.CheckpointError, match=r"no checkpoint at"):
        Trainer.resume(str(tmp_path / "missing.ckpt"), tr.surgeon, tr.optimizer)
    _assert_untouched(tr, before)


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    tr, path = _saved(tmp_path)
    good = path.read_bytes()
    (tmp_path / f".{path.name}.tmp-999999").write_bytes(b"half")  # left by a killed writer
    _run(tr, 2)

    def die(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", die)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(str(path))
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.ckpt"]  # no temp file left
    assert ckpt.read_header(path).epoch == 1
