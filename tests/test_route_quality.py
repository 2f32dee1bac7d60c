"""benchmarks/route_quality.py in its bounded --quick form: train once, score many, resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import route_quality as rq  # noqa: E402

from routesurgeon.viz.quality import quality_points, quality_svg  # noqa: E402


@pytest.mark.slow
def test_quick_route_quality_runs_resumes_and_summarises(tmp_path: Path) -> None:
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
