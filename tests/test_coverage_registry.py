"""The whole-registry benchmark (``benchmarks/coverage_timm.py``) on one tiny timm model per form,
and its report: what the slow run does, kept from rotting in CI."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.coverage

pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # where a script finds benchmarks/_common.py
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


def test_registry_run_and_report(tmp_path: Path) -> None:
    bench, report = _load("coverage_timm"), _load("coverage_report")
    entry = {"name": "test_resnet", "input_size": [3, 160, 160], "img_size_kw": False}
    attempts = bench._attempts(entry, 96)
    assert attempts == [(96, {}), ((160, 160), {})]  # the small size first, then the default
    rows = {}
    for features_only in (True, False):
        r = bench.run_case("timm:test_resnet", features_only, attempts, 120)
        assert r["status"] == "ok", r
        assert r["input_size"] == 96 and r["route_exact"] and r["routes"] == r["tasks"] >= 2
        rows[r["key"]] = r
    bad = {"key": "timm:x features_only", "spec": "timm:x", "form": "features_only",
           "path": "fx", "status": "export-error",
           "error": "ExportError: route 'stage0' fails | to run"}
    rows[bad["key"]] = bad
    population = {n: {"name": n, "params": p} for n, p in
                  [("test_resnet", 10), ("x", 20), ("big", 10**9)]}
    text = report.section(rows, population, 1e6)
    assert "**2 architectures**" in text  # 'big' is over the bound
    assert "| timm `features_only` | 2 | 2 | 2 (100.0%) | **1 / 2** (50.0%) | 1 |" in text
    assert "| timm backbone + 3 heads | 1 | 1 | 1 (100.0%) | **1 / 1** (100.0%) | 1 |" in text
    assert "| `timm:x` | features_only | export | ExportError: route 'stage0' fails / to run |" \
        in text
    # the registry headline counts 'big' (never run) against the registry and names it
    assert "**timm's whole registry, `features_only`: 1 / 3 names ok (33.3%)**" in text
    assert "`big` (1000 M)" in text
    doc = tmp_path / "coverage.md"
    doc.write_text("# Tracing coverage\n\nnamed models\n")
    report.write(doc, text)
    report.write(doc, text.replace("**1 / 2**", "**2 / 2**"))  # regenerated in place
    out = doc.read_text()
    assert out.startswith("# Tracing coverage") and out.count(report.BEGIN) == 1
    assert "**2 / 2**" in out and "**1 / 2**" not in out
    json.dumps(rows)  # rows are what the benchmark appends as JSON lines
