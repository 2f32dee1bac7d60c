"""Recipe 2: multi-exit Fashion-MNIST (anytime prediction).

A timm ``resnet18`` (random init, 1 channel, 28x28) with a classifier exit after each chosen stage
(``rs.multi_exit``; fine labels, 10 classes, at every exit) and a coarse head (4 groups: tops,
bottoms+dresses, footwear, bags) on the last stage as an extra task. Every method of
``rs.available_methods()`` plus single-task baselines; the table lists accuracy per exit, like the
anytime-prediction tables of multi-exit papers.

    python recipes/multiexit.py --out runs/r2
    python recipes/multiexit.py --quick --out runs/r2q
    python recipes/multiexit.py --preset full --out runs/r2full
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

import routesurgeon as rs
from routesurgeon.datasets import COARSE_GROUPS, FineCoarseFashion


@dataclass(frozen=True)
class Config:
    stages: tuple[int, ...] = (2, 3, 4)  # timm feature stages that get an exit
    n_train: int = 6000
    n_test: int = 2000
    run: h.RunConfig = field(default_factory=lambda: h.RunConfig(epochs=3))


PRESETS = {
    "quick": Config(n_train=128, n_test=64,
                    run=h.RunConfig(epochs=1, batch_size=32, methods=("equal", "drmgf-step",
                                                                      "drmgf"),
                                    route_methods=("drmgf-step",), progress=False)),
    "default": Config(),
    # the budgets of docs/results.md (h.FULL_RUN: 192 steps, h.SMALL_RUN: 64 steps)
    "full": Config(n_train=2048, n_test=1000, run=h.FULL_RUN),
    "small": Config(n_train=1024, n_test=500, run=h.SMALL_RUN),
}


class ExitsWithCoarse(nn.Module):
    """``rs.multi_exit`` exits plus a coarse-label head on the deepest stage."""

    def __init__(self, exits: rs.MultiExit, coarse_classes: int) -> None:
        super().__init__()
        self.exits = exits
        self.coarse = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                    nn.Linear(exits.exits[-1][-1].in_features, coarse_classes))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = list(self.exits.features(x))
        out = {n: head(f) for n, head, f in zip(self.exits.names, self.exits.exits, feats)}
        out["coarse"] = self.coarse(feats[-1])
        return out


def exit_names(cfg: Config) -> list[str]:
    return [f"exit{i}" for i in range(len(cfg.stages))]


def build_model(cfg: Config, seed: int) -> tuple[nn.Module, Tensor]:
    import timm

    torch.manual_seed(seed)
    net = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)
    model = ExitsWithCoarse(rs.multi_exit(net, stages=list(cfg.stages), num_classes=10),
                            len(COARSE_GROUPS))
    return model, torch.zeros(2, 1, 28, 28)


def make_recipe(cfg: Config) -> h.Recipe:
    names = exit_names(cfg)
    train = FineCoarseFashion(True, fine_tasks=names, n=cfg.n_train)
    test = FineCoarseFashion(False, fine_tasks=names, n=cfg.n_test)
    ce = nn.functional.cross_entropy
    tasks = {t: h.TaskSpec(ce, (h.accuracy(),)) for t in [*names, "coarse"]}
    desc = (f"Fashion-MNIST, {cfg.n_train} train / {cfg.n_test} test images (seeded subsets of "
            f"the official splits), resnet18 random init, exits after stages {list(cfg.stages)} "
            f"+ coarse head, Adam lr {cfg.run.lr}, batch {cfg.run.batch_size}, "
            f"{cfg.run.epochs} epochs")
    return h.Recipe("multi-exit Fashion-MNIST resnet18", lambda seed: build_model(cfg, seed),
                    tasks, train, test, desc)


def anytime_table(result: dict) -> str:
    """Per method: accuracy at each exit (mean over seeds), like an anytime-prediction table."""
    table = result["summary"]["methods"]
    keys = [k for k in result["summary"]["keys"] if k.startswith("exit")]
    single = result["summary"]["single_task"]
    lines = ["| method | " + " | ".join(k.split("/")[0] for k in keys) + " | mean |",
             "|" + "---|" * (len(keys) + 2)]

    def row(name: str, values: list[list[float]]) -> str:
        means = [sum(v) / len(v) for v in values]
        return (f"| {name} | " + " | ".join(f"{100 * m:.2f}" for m in means)
                + f" | {100 * sum(means) / len(means):.2f} |")

    if all(single.get(k) for k in keys):
        lines.append(row("single-task (one net per exit)", [single[k] for k in keys]))
    for m in sorted(table, key=lambda m: -sum(sum(table[m][k]) for k in keys)):
        lines.append(row(m, [table[m][k] for k in keys]))
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> tuple[Config, Path]:
    p = h.recipe_parser(__doc__, "runs/multiexit", PRESETS)
    a = p.parse_args(argv)
    cfg = h.chosen_preset(PRESETS, a)
    return cfg, Path(a.out)


def main(argv: list[str] | None = None) -> dict:
    cfg, out = parse(argv)
    out = h.fresh_dir(out)
    result = h.run_recipe(make_recipe(cfg), cfg.run, out)
    anytime = anytime_table(result)
    (out / "anytime.md").write_text(anytime)
    print((out / "results.md").read_text())
    print("Anytime prediction (top-1 % per exit, mean over seeds):\n" + anytime)
    print(f"results, report and pictures in {out}")
    return result


if __name__ == "__main__":
    main()
