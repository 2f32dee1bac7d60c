"""benchmarks/route_quality.py in its bounded --quick form: train once, score many, resumable."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import route_quality as rq  # noqa: E402

from routesurgeon.viz.quality import quality_points, quality_svg  # noqa: E402


@pytest.mark.slow
def test_quick_route_quality_runs_resumes_and_summarises(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    out = tmp_path / "rq.jsonl"
    args = ["--quick", "--out", str(out), "--variants", "learned", "disparse", "tp-magnitude",
            "--tasks", "left", "--n-test", "32"]
    rq.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["learned", "disparse", "tp-magnitude"]
    for r in rows:
        assert set(r) >= {"exported", "recalibrated", "finetuned", "full", "flops_fraction"}
        assert 0.3 < r["flops_fraction"] <= 0.5  # every variant within the same FLOPs budget
        assert 0.0 <= r["recalibrated"]["left/acc"] <= 1.0
    assert (tmp_path / "rq-multifashion-seed0.pt").exists()  # the trained model is cached
    rq.main(args)  # resumes: nothing left to do, nothing appended
    assert len(out.read_text().splitlines()) == 3
    rq.main(["--summarise", str(out), "--md", str(tmp_path / "t.md"),
             "--png", str(tmp_path / "c.png")])
    assert "| 0.5 | tp-magnitude |" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "c.png").stat().st_size > 1000
    pts = quality_points(rows, "finetuned")["multifashion"]
    assert set(pts) == {"learned", "disparse", "tp-magnitude"}
    assert "<svg" in quality_svg(rows)
    capsys.readouterr()
    rq.main(["--quick", "--out", str(out), "--diagnose"])  # from the cached model
    rows_of = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines()
               if ln.startswith("| multifashion | 0 |")]
    moved = [r for r in rows_of if len(r) == 7]  # the movement table: one row per task
    assert [r[2] for r in moved] == ["left", "right"]
    for r in moved:
        rho_init, change = float(r[3]), float(r[4])
        assert -1 <= rho_init <= 1 and change >= 0
        for cell in r[5:]:  # within-layer rank correlation / share of the top half both keep
            rho, shared = (float(v) for v in cell.strip(" |").split(" / "))
            assert -1 <= rho <= 1 and 0 <= shared <= 1


@pytest.mark.slow
def test_quick_route_quality_with_reconstruction(tmp_path: Path) -> None:
    out = tmp_path / "rq.jsonl"
    rq.main(["--quick", "--out", str(out), "--variants", "raw-importance", "tp-taylor",
             "--tasks", "left", "--n-test", "32", "--reconstruct", "--finetune-lr", "1e-4"])
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {r["study"]["finetune_lr"] for r in rows.values()} == {1e-4}
    ours = rows["raw-importance"]
    assert set(ours) >= {"recalibrated", "reconstructed", "finetuned", "reconstructed_finetuned"}
    assert 0.0 <= ours["reconstructed_finetuned"]["left/acc"] <= 1.0
    # torch-pruning's copy is re-fitted too (its kept channels read off its weights)
    assert set(rows["tp-taylor"]) >= {"reconstructed", "reconstructed_finetuned", "finetuned"}
    md = tmp_path / "t.md"
    rq.main(["--summarise", str(out), "--md", str(md)])
    text = md.read_text()
    assert "reconstructed (lsq + BN)" in text and "reconstructed, fine-tuned" in text


def _row(variant: str, seed: int, task: str, budget: float, acc: float) -> dict:
    return {"recipe": "r", "seed": seed, "variant": variant, "budget": budget, "task": task,
            "flops_fraction": budget - 0.01, "metric": f"{task}/acc",
            "full": {f"{task}/acc": 0.8}, "recalibrated": {f"{task}/acc": acc}}


def test_quality_points_average_tasks_then_seeds_and_the_report_shows_them(net, x) -> None:
    import routesurgeon as rs
    from routesurgeon.viz.report import render_report

    rows = [_row("a", 0, "t1", 0.5, 0.4), _row("a", 0, "t2", 0.5, 0.8),
            _row("a", 1, "t1", 0.5, 0.8), _row("a", 1, "t2", 0.5, 0.8),
            _row("a", 2, "t1", 0.5, 0.8)]  # seed 2 lacks t2: left out
    (flops, mean, std), = quality_points(rows)["r"]["a"]
    assert flops == pytest.approx(0.49)
    assert mean == pytest.approx((0.75 + 1.0) / 2) and std == pytest.approx(0.1767767)
    html = render_report(rs.instrument(net, x).topology, route_quality=rows)
    section = html.split('<section id="routes"', 1)[1].split("</section>", 1)[0]
    assert "Route quality" in section and "<svg" in section and "r: route / full" in section
    assert '<section id="routes"' not in render_report(rs.instrument(net, x).topology)


def test_harness_recalibrates_exported_routes(net, x) -> None:
    sys.path.insert(0, str(ROOT / "recipes"))
    import harness as h
    import torch
    import torch.nn.functional as F

    import routesurgeon as rs
    from routesurgeon.datasets import TaskTensors
    from tests.toydata import batches

    data = batches(32, 32)[0]
    ds = TaskTensors(data[0], {t: v for t, v in data[1].items() if t != "d"}, channels=3)
    tasks = {t: h.TaskSpec(F.cross_entropy, (h.accuracy(),)) for t in ("a", "b")}
    recipe = h.Recipe("toy", lambda seed: (net, x), tasks, ds, ds, task_names=["a", "b", "d"])
    s = rs.instrument(net, x, tasks=["a", "b", "d"])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = h.RunConfig(batch_size=8, max_batches=2, recalibrate_batches=2, progress=False)
    out = h.export_routes(s, recipe, cfg, 0, tasks=["a"])
    assert 0.0 <= out["a"]["metric_recalibrated"]["a/acc"] <= 1.0
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items()
               if "running" in k)  # the full model's BN statistics are untouched
    fitted = h.export_routes(s, recipe, replace(cfg, reconstruct=True), 0, tasks=["a"])
    assert "metric_recalibrated" not in fitted["a"]
    assert 0.0 <= fitted["a"]["metric_reconstructed"]["a/acc"] <= 1.0
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())  # nothing moved


def test_paired_table_against_the_default() -> None:
    from route_quality_tables import paired_table, per_seed

    def row(variant: str, seed: int, task: str, got: float) -> dict:
        return {"recipe": "r", "budget": 0.5, "variant": variant, "seed": seed, "task": task,
                "metric": f"{task}/acc", "full": {f"{task}/acc": 0.5},
                "reconstructed": {f"{task}/acc": got}}

    rows = []
    for s, base in enumerate([0.40, 0.45, 0.42, 0.47]):
        for t in ("x", "y"):
            rows += [row("raw-importance", s, t, base), row("taylor", s, t, base + 0.05),
                     row("noisy", s, t, base + (0.05 if s % 2 else -0.05))]
    rows.append(row("partial", 0, "x", 0.5))  # a seed without every task counts for nothing
    assert per_seed(rows, "r", "partial", "reconstructed") == {}
    assert per_seed(rows, "r", "taylor", "reconstructed")[1] == pytest.approx(1.0)
    text = paired_table(rows, stages=("reconstructed",))
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in text.splitlines() if ln.startswith("|")}
    assert "| taylor | 4 | 0.970 | +0.100 | ± 0.000 | 0.000 |" in lines["taylor"]
    assert "| noisy | 4 | 0.870 | +0.000 |" in lines["noisy"] and "1.000 |" in lines["noisy"]
    assert "partial" not in lines and lines["raw-importance"].endswith("| – | – | – |")
    assert list(lines)[2:5] == ["taylor", "noisy", "raw-importance"]  # sorted by mean
    # every budget in the rows gets its own table, or only those asked for
    rows += [dict(r, budget=0.25) for r in rows if r["variant"] in ("raw-importance", "taylor")]
    both = paired_table(rows, stages=("reconstructed",))
    assert "at 0.25 of the FLOPs" in both and "at 0.5 of the FLOPs" in both
    assert both.index("at 0.25 of") < both.index("at 0.5 of")
    assert "at 0.25 of" not in paired_table(rows, stages=("reconstructed",), budgets=[0.5])


def test_why_summary_pairs_criteria_over_seeds_with_fine_tune_repeats(tmp_path: Path) -> None:
    import route_quality_why as why

    rows = []
    for s in range(3):
        for t in ("x", "y"):
            rows += [{"seed": s, "task": t, "variant": "raw-importance", "lsq": 0.9,
                      "lsq_ft": [0.9, 0.8, 1.0], "refit_growth_max": 4.0},
                     {"seed": s, "task": t, "variant": "group-magnitude", "lsq": 0.9 + 0.01 * s,
                      "lsq_ft": [1.0, 1.0, 1.0], "refit_growth_max": 3.0}]
    path = tmp_path / "why.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = why.summary(path)
    row = next(ln for ln in text.splitlines() if ln.startswith("| raw-importance"))
    # first order 0.9, mean of orders 0.9, spread sd 0.1, worst 0.8, growth 4
    assert row == "| raw-importance | 0.900 | 0.900 | 0.900 | 0.100 | 0.800 | 4.00 |"
    assert "re-fitted, per seed: +0.000, +0.010, +0.020; mean +0.010" in text
    assert "fine-tuned (mean of orders), per seed: +0.100, +0.100, +0.100; mean +0.100" in text
