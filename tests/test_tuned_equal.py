"""The harness's ``tuned-equal`` entry: a learning-rate sweep of ``equal`` chosen on a validation
split held out of the training set, then retrained on the whole training set."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

h = importlib.import_module("harness")
te = importlib.import_module("tuned_equal")


class Data:
    """Two linearly separable tasks on 8 features, batched like the recipes' datasets."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = {"a": (self.x[:, 0] > 0).long(), "b": (self.x[:, 1] + self.x[:, 2] > 0).long()}

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx):  # type: ignore[no-untyped-def]
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.x[idx], {t: v[idx] for t, v in self.y.items()}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.a, self.b = nn.Linear(16, 2), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.relu(self.trunk(x))
        return {"a": self.a(z), "b": self.b(z)}


def _recipe() -> h.Recipe:
    def build(seed: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(seed)
        return Net(), torch.zeros(2, 8)

    tasks = {t: h.TaskSpec(F.cross_entropy, (h.accuracy(),)) for t in ("a", "b")}
    return h.Recipe("toy", build, tasks, Data(200, 0), Data(100, 1))


CFG = h.RunConfig(epochs=2, batch_size=20, lr=1e-2, methods=("tuned-equal", "equal"),
                  single_task=False, route_methods=(), progress=False,
                  tuned_lr_factors=(1e-3, 1.0))


def test_validation_split_is_seeded_disjoint_and_complete() -> None:
    data = Data(50, 0)
    train, val = te.validation_split(data, 0.2, seed=3)
    assert (len(train), len(val)) == (40, 10)
    both = torch.cat([train.indices, val.indices]).sort().values
    assert torch.equal(both, torch.arange(50))  # disjoint and complete
    again = te.validation_split(data, 0.2, seed=3)[1]
    assert torch.equal(again.indices, val.indices)
    assert not torch.equal(te.validation_split(data, 0.2, seed=4)[1].indices, val.indices)
    x, ys = val.batch([0, 1])
    assert torch.equal(ys["a"], data.y["a"][val.indices[:2]])
    torch.testing.assert_close(x, data.x[val.indices[:2]])
    with pytest.raises(ValueError, match="fraction must be in"):
        te.validation_split(data, 1.0, seed=0)


def test_pick_lr_uses_every_metric_and_its_direction() -> None:
    hib = {"t/acc": True, "u/err": False}
    val = {1e-3: {"t/acc": 0.80, "u/err": 2.0}, 3e-3: {"t/acc": 0.82, "u/err": 1.0},
           1e-2: {"t/acc": 0.90, "u/err": 4.0}}
    # delta_m against the sweep mean (acc 0.84, err 7/3): 3e-3 is -0.024 - 0.571 (best)
    assert te.pick_lr(val, hib) == 3e-3
    assert te.pick_lr(val, {"t/acc": True}) == 1e-2  # on accuracy alone
    tie = {1e-3: {"t/acc": 0.5}, 1e-2: {"t/acc": 0.5}}
    assert te.pick_lr(tie, {"t/acc": True}) == 1e-3  # ties go to the earlier grid entry
    zero = {1e-3: {"t/acc": 0.0}, 1e-2: {"t/acc": 0.0}, 1e-1: {"t/acc": 0.0}}
    assert te.pick_lr(zero, {"t/acc": True}) == 1e-3  # delta_m undefined: mean rank


def test_tuned_equal_runs_in_the_harness_and_reports_its_choice(tmp_path: Path) -> None:
    result = h.run_recipe(_recipe(), CFG, tmp_path)
    runs = {r["method"]: r for r in result["runs"]}
    tuned = runs["tuned-equal"]["tuned"]
    assert tuned["grid"] == pytest.approx([1e-5, 1e-2])
    assert (tuned["n_train"], tuned["n_val"]) == (180, 20)
    assert set(tuned["val_metrics"]) == {repr(1e-5), repr(1e-2)}
    # lr 1e-5 barely moves a fresh net in 18 steps; 1e-2 learns both tasks: chosen on validation
    assert tuned["lr"] == pytest.approx(1e-2)
    assert tuned["tune_wall_s"] > 0
    # retrained on the whole training set at the chosen lr: the same run as `equal` at lr 1e-2
    assert runs["tuned-equal"]["metrics"] == pytest.approx(runs["equal"]["metrics"])
    assert "| tuned-equal |" in (tmp_path / "results.md").read_text()
    lines = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in lines] == ["tuned-equal", "equal"]


def test_tuned_equal_is_in_the_default_method_list_and_can_lose_to_a_smaller_lr() -> None:
    assert h.default_methods()[-1] == "tuned-equal"
    assert "tuned-equal" not in h.rs.available_methods()  # a harness entry, not a method
    cfg = replace(CFG, lr=30.0, tuned_lr_factors=(1.0, 1e-3))  # lr 30 diverges, 0.03 learns
    _, _, rec = te.train_tuned_equal(_recipe(), "tuned-equal", 0, cfg)
    assert rec["tuned"]["lr"] == pytest.approx(0.03)
