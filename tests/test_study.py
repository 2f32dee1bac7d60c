"""The method study (recipes/study.py, recipes/study_tables.py): resume and skip, exact extension
to the pass-matched budget, the statistics against scipy, the tables from a small jsonl, and the
GPU preset's code path (bf16 autocast) in a tiny form on the CPU."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import study as st
import study_tables as tb

import routesurgeon as rs

TINY = replace(st.STUDIES["tiny"], bf16=False)


def test_lenet_traces_and_instruments() -> None:
    from lenet import LeNetExits, MultiLeNet, example

    for model, size, tasks in [(MultiLeNet(size=28), 28, ["left", "right"]),
                               (MultiLeNet(size=36), 36, ["left", "right"]),
                               (LeNetExits(), 28, ["exit0", "exit1", "exit2", "coarse"])]:
        x = torch.rand(3, 1, size, size)
        surgeon = rs.instrument(model, example(size), tasks=tasks)
        eager = model(x)
        traced = surgeon.eval()(x)
        assert set(traced) == set(tasks)
        for t in tasks:
            torch.testing.assert_close(traced[t], eager[t])
        assert surgeon.importance_bank.names  # the trunk is shared: DR-MGF has work to do


def test_runs_resume_skip_and_extend_exactly(tmp_path: Path) -> None:
    log: list[str] = []
    first = st.run_study(TINY, tmp_path, ["equal"], [0], log=log.append)
    assert len(first) == 1 and len(first[0]["epochs"]) == TINY.epochs
    # done runs are skipped: nothing new is trained or written
    assert st.run_study(TINY, tmp_path, ["equal"], [0], log=log.append) == []
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 1
    # the matched phase extends the run from its checkpoint to (T + 1) x epochs ...
    ext = st.run_study(TINY, tmp_path, ["equal"], [0], phase="matched", log=log.append)
    assert len(ext[0]["epochs"]) == 3 * TINY.epochs
    assert ext[0]["epochs"][:TINY.epochs] == first[0]["epochs"]
    # ... and equals one uninterrupted run of that length
    whole = st.run_one(TINY, "equal", 0, st.load_splits(TINY), tmp_path / "other", "matched")
    for a, b in zip(ext[0]["epochs"], whole["epochs"], strict=True):
        assert a["val"] == b["val"] and a["passes"] == b["passes"]
    assert ext[0]["final"] == whole["final"]
    # the test set is evaluated at the two budgets' epochs only
    assert [e["epoch"] for e in ext[0]["epochs"] if "test" in e] == [TINY.epochs, 3 * TINY.epochs]
    # the last line supersedes: one record per (study, method, seed)
    assert len(st.load_records(tmp_path / "runs.jsonl")) == 1
    # a different configuration under the same study name is refused, not mixed
    with pytest.raises(ValueError, match="another configuration"):
        st.run_study(replace(TINY, lr=0.01), tmp_path, ["equal"], [0])


def test_claimed_runs_are_left_to_their_worker(tmp_path: Path) -> None:
    with st.claim(tmp_path, "s/equal/0") as mine:
        assert mine
        with st.claim(tmp_path, "s/equal/0") as again:
            assert not again
    lock = tmp_path / "locks" / "s_equal_0.lock"
    assert not lock.exists()
    lock.write_text("999999999")  # a dead worker's lock is taken over
    with st.claim(tmp_path, "s/equal/0") as mine:
        assert mine
    log: list[str] = []  # a live worker's lock is respected
    key = f"{TINY.name}/equal/0"
    (tmp_path / "locks" / f"{key.replace('/', '_')}.lock").write_text(str(os.getpid()))
    assert st.run_study(TINY, tmp_path, ["equal"], [0], log=log.append) == []
    assert "another worker" in log[-1]


def test_method_specs_and_budgets() -> None:
    assert st.parse_method("drmgf-step:uniform_mix=0.5,importance=gated") == (
        "drmgf-step", {"uniform_mix": 0.5, "importance": "gated"})
    assert st.parse_method("equal:lr=0.003") == ("equal", {"lr": 0.003})
    with pytest.raises(ValueError, match="key=value"):
        st.parse_method("equal:lr")
    assert st.target_epochs("drmgf", TINY, "matched") == TINY.epochs
    assert st.target_epochs("pcgrad", TINY, "matched") == 3 * TINY.epochs  # T + 1 = 3
    assert st.target_epochs("pcgrad", TINY, "epoch") == TINY.epochs


def test_ci_and_paired_tests_match_scipy() -> None:
    x = [0.71, 0.74, 0.69, 0.73, 0.72]
    mean, half = tb.ci95(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=sum(x) / 5, scale=stats.sem(x))
    assert mean == pytest.approx((lo + hi) / 2) and half == pytest.approx((hi - lo) / 2)
    assert math.isnan(tb.ci95([0.5])[1])
    a = [0.75, 0.77, 0.72, 0.76, 0.74]
    p = tb.paired_tests(a, x)
    d = [u - v for u, v in zip(a, x)]
    t = (sum(d) / 5) / (stats.tstd(d) / math.sqrt(5))
    assert p["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), 4))
    assert p["diff"] == pytest.approx(sum(d) / 5)
    assert p["wilcoxon_p"] == pytest.approx(2 / 2**5)  # all 5 differences positive: exact
    assert math.isnan(tb.paired_tests(x, x)["wilcoxon_p"])


def test_holm_step_down() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x, made monotone: 0.02, 0.03, 0.06, 0.06
    assert tb.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = tb.holm([0.01, math.nan, 0.5])  # nan is not counted in the family
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.5)
    assert tb.holm([0.6, 0.7]) == [1.0, 1.0]


def _record(method: str, seed: int, val: float, test: float, epochs: int = 2,
            passes: int = 1, tasks: tuple[str, ...] = ("left", "right")) -> dict:
    eps = []
    for e in range(1, epochs + 1):
        f = e / epochs
        eps.append({"epoch": e, "passes": float(e * passes), "cpu_s": 10.0 * e * passes,
                    "wall_s": 10.0 * e * passes,
                    "val": {f"{t}/acc": val * f for t in tasks},
                    "test": {f"{t}/acc": test * f for t in tasks}})
    return {"study": "s", "config": {"epochs": 2}, "method": method, "seed": seed,
            "epochs": eps, "cpu_s": eps[-1]["cpu_s"], "wall_s": eps[-1]["wall_s"],
            "passes": eps[-1]["passes"]}


def test_tables_from_a_small_jsonl(tmp_path: Path) -> None:
    recs = []
    for s in range(3):
        recs += [_record("single:left", s, 0.5, 0.5, tasks=("left",)),
                 _record("single:right", s, 0.5, 0.5, tasks=("right",)),
                 # best on validation, worse on test: the best baseline is chosen on validation
                 _record("pcgrad", s, 0.80, 0.60 + 0.01 * s),
                 _record("equal", s, 0.70, 0.70 + 0.01 * s),
                 _record("equal:lr=0.003", s, 0.75 if s else 0.60, 0.55),
                 _record("drmgf", s, 0.70, 0.65 + 0.02 * s, passes=3)]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = tb.load([path])
    view = tb.budget_view(records, "s", "epoch")
    assert tb.best_baseline(view) == "pcgrad"
    # tuned-equal: per seed the sweep member best on validation
    assert [view["tuned-equal"][s]["chosen"] for s in range(3)] == [
        "equal", "equal:lr=0.003", "equal:lr=0.003"]
    table = tb.study_markdown(records, "s", "epoch")
    row = next(line for line in table.splitlines() if line.startswith("| drmgf |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3"
    m, half = tb.ci95([0.65, 0.67, 0.69])
    assert cells[4] == f"{100 * m:.2f} ± {100 * half:.2f}"
    assert cells[5].startswith(f"{-(0.67 - 0.5) / 0.5 * 100:.2f}")  # Δm vs single-task nets
    p = tb.paired_tests([0.65, 0.67, 0.69], [0.60, 0.61, 0.62])
    assert cells[-3] == f"{p['t_p']:.3f}" and cells[-4].startswith(f"{100 * p['diff']:.2f}")
    # Holm over the table's comparisons: never below the raw p, one per compared row
    assert float(cells[-2]) >= float(cells[-3])
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in table.splitlines()[2:]]
    assert sum(r[-2] != "–" for r in rows) == sum(r[-3] != "–" for r in rows) >= 3
    # at the matched budget drmgf's 6 passes: the 1-pass methods have no run that long here
    assert set(tb.budget_view(records, "s", "matched")) == {"drmgf"}
    tta = tb.time_to_accuracy(records, "s", 0.72)  # on validation
    assert tta["pcgrad"]["cpu_s"] == 20.0 and tta["equal"]["reached"] == 0
    assert tta["equal:lr=0.003"]["reached"] == 2 and tta["drmgf"]["reached"] == 0
    png = tb.curves_png(records, "s", tmp_path / "c.png")
    assert png.stat().st_size > 1000


def test_gpu_preset_tiny_form_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The GPU study's code path (its resnet18, the Trainer's bf16 precision, data 'resident' on
    the device), shrunk to seconds on the CPU."""
    with pytest.raises(SystemExit, match="CUDA"):
        if torch.cuda.is_available():
            raise SystemExit("CUDA is here: the refusal is not testable")
        st.main(["--gpu-preset", "--out", str(tmp_path / "x")])
    done = st.main(["--gpu-preset", "--device", "cpu", "--tiny", "--out", str(tmp_path),
                    "--methods", "equal", "drmgf-step", "nash-mtl"])
    assert [r["precision"] for r in done] == ["bf16", "bf16", "bf16"]
    for r in done:
        assert r["config"]["model"] == "resnet18" and r["config"]["bf16"]
        assert all(0.0 <= v <= 1.0 for v in r["final"].values())
    out = capsys.readouterr().out
    assert "gpu-r1-fashion-resnet18-tiny" in out
