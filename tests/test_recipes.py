"""The recipes' quick modes end to end (what CI runs), and the harness's bookkeeping."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

h = importlib.import_module("harness")


def _check_run(out: Path, methods: tuple[str, ...], tasks: list[str]) -> dict:
    result = json.loads((out / "results.json").read_text())
    table = result["summary"]["methods"]
    assert sorted(table) == sorted(methods)  # every requested method ran in the same harness
    for m in methods:
        for key in result["summary"]["keys"]:
            assert all(math.isfinite(v) for v in table[m][key]), (m, key)
        assert table[m]["passes"][0] >= 1 and table[m]["wall_s"][0] > 0
    assert {s["task"] for s in result["single_task"]} == set(tasks)
    text = (out / "results.md").read_text()
    assert "| single-task |" in text and "Δm" in text
    assert (out / "report.html").stat().st_size > 10_000
    assert (out / "topology.png").read_bytes()[:4] == b"\x89PNG"
    return result


@pytest.mark.parametrize(
    ("module", "tasks"),
    [("multifashion", ["left", "right"]),
     ("multiexit", ["exit0", "exit1", "exit2", "coarse"]),
     ("dense", ["seg", "depth", "normals"])],
)
def test_quick_recipe_runs_end_to_end(tmp_path, module, tasks):
    mod = importlib.import_module(module)
    mod.main(["--quick", "--out", str(tmp_path / "run")])
    result = _check_run(tmp_path / "run", mod.PRESETS["quick"].run.methods, tasks)
    routes = result["routes"]["drmgf-step"]
    assert set(routes) == set(tasks)
    for r in routes.values():  # exported routes are smaller and were measured
        assert r["params"] < r["full_params"] and r["flops"] < r["full_flops"]
        assert r["latency_ms"] > 0 and r["metric_route"] and r["metric_finetuned"]
    if module == "multiexit":
        assert "exit2" in (tmp_path / "run" / "anytime.md").read_text()


def test_quick_onet_exports_a_smaller_face_route(tmp_path):
    onet = importlib.import_module("onet")
    onet.main(["--quick", "--out", str(tmp_path / "run")])
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    route = result["extras"]["drmgf-step"]["0"]["0.5"]
    assert route["params"] < 0.5 * route["full_params"]
    assert 0.5 <= route["metric_finetuned"]["face/auc"] <= 1.0
    assert "AUC route" in (tmp_path / "run" / "routes.md").read_text()


def test_fresh_dir_never_overwrites(tmp_path):
    first = h.fresh_dir(tmp_path / "demo")
    (first / "report.html").write_text("x")
    second = h.fresh_dir(tmp_path / "demo")
    assert first == tmp_path / "demo" and second == tmp_path / "demo-2"
    assert (first / "report.html").read_text() == "x"


def test_summary_delta_m_and_ranks():
    hib = {"t/acc": True, "u/err": False}
    singles = [{"task": "t", "seed": 0, "metrics": {"t/acc": 0.5}},
               {"task": "u", "seed": 0, "metrics": {"u/err": 2.0}}]
    runs = [{"method": "a", "seed": 0, "metrics": {"t/acc": 0.6, "u/err": 1.0},
             "wall_s": 1.0, "passes": 1},
            {"method": "b", "seed": 0, "metrics": {"t/acc": 0.4, "u/err": 2.0},
             "wall_s": 1.0, "passes": 3}]
    s = h.summarise(hib, runs, singles)
    # a: acc +20% (better, sign flipped), err -50% (better): mean -35; b: acc -20% worse: +10
    assert s["methods"]["a"]["delta_m"] == [pytest.approx(-35.0)]
    assert s["methods"]["b"]["delta_m"] == [pytest.approx(10.0)]
    assert s["methods"]["a"]["mean_rank"] == 1 and s["methods"]["b"]["mean_rank"] == 2
    assert "| a |" in h.markdown(s, "toy")
    runs[1]["metrics"] = dict(runs[0]["metrics"])  # a tie shares the mean rank
    tied = h.summarise(hib, runs, singles)
    assert tied["methods"]["a"]["mean_rank"] == tied["methods"]["b"]["mean_rank"] == 1.5


def test_face_auc_matches_the_rank_definition():
    import numpy as np
    import torch

    onet = importlib.import_module("onet")
    metric = onet.face_auc()
    rng = np.random.default_rng(0)
    margin = torch.from_numpy(rng.normal(size=300)).float()
    y = torch.from_numpy((rng.random(300) < 0.5).astype(np.int64))
    margin[y == 1] += 1.0
    out = torch.stack([torch.zeros(300), margin], 1)
    stats = metric.stats(out[:100], y[:100]) + metric.stats(out[100:], y[100:])
    pos, neg = margin[y == 1], margin[y == 0]
    exact = float((pos[:, None] > neg[None]).float().mean())
    assert metric.finish(stats) == pytest.approx(exact, abs=0.01)


def test_routes_table_shows_the_recalibrated_metric_only_when_measured() -> None:
    row = {"keep": 0.5, "scores": "raw-importance", "params": 2e6, "full_params": 8e6,
           "flops": 1e6, "full_flops": 4e6, "latency_ms": 1.0, "full_latency_ms": 3.0,
           "metric_full": {"left/acc": 0.6}, "metric_route": {"left/acc": 0.1},
           "metric_finetuned": {"left/acc": 0.5}}
    plain = h.routes_markdown({"equal": {"left": row}}).splitlines()
    assert "BN-recalibrated" not in plain[0] and plain[2].endswith("| acc 0.1 | acc 0.5 |")
    recal = {**row, "metric_recalibrated": {"left/acc": 0.55}}
    lines = h.routes_markdown({"equal": {"left": recal}, "pcgrad": {"left": row}}).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 12
    assert "| route | route BN-recalibrated | route fine-tuned |" in lines[0]
    assert lines[2].endswith("| acc 0.1 | acc 0.55 | acc 0.5 |")
    assert lines[3].endswith("| acc 0.1 | – | acc 0.5 |")  # a route without it says so
    both = {**recal, "metric_reconstructed": {"left/acc": 0.58}}
    lines = h.routes_markdown({"equal": {"left": both}}).splitlines()
    assert "| route BN-recalibrated | route reconstructed | route fine-tuned |" in lines[0]
    assert lines[2].endswith("| acc 0.1 | acc 0.55 | acc 0.58 | acc 0.5 |")
