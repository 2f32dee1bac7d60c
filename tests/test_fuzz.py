"""Property-based fuzzing: random multi-output conv nets must export correct routes.

Every generated net (``tests/netgen.py``) is instrumented, trained a few DR-MGF steps, and its
routes exported at keep 1.0 / 0.5 / 0.25 with learned and magnitude scores; each route is checked
against the model (unpruned, to the bit) and its masked reference (pruned, 1e-5 relative) and must
be smaller when pruned. A net may be *refused* (filter groups kept whole, each with a reason),
never *wrong*. Shrunk failures live in ``tests/regressions/fuzz_specs.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).parent))
import netgen

REGRESSIONS = Path(__file__).parent / "regressions" / "fuzz_specs.json"
N_EXAMPLES = 60


def _regressions() -> list[dict[str, Any]]:
    return json.loads(REGRESSIONS.read_text())


def test_hypothesis_nets_are_never_wrong() -> None:
    torch.set_num_threads(1)
    seen: list[str] = []

    @settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(netgen.specs())
    def run(spec: dict[str, Any]) -> None:
        out = netgen.check_spec(spec)
        seen.append(out.status)
        assert out.status != "wrong", f"{json.dumps(spec)}\n{out.detail}"
        if out.status == "correct":
            assert out.routes_checked >= 2 * 3 * len(spec["heads"])
            assert out.max_error <= netgen.TOL

    run()
    assert len(seen) >= 50, f"only {len(seen)} generated nets ran"
    # every block kind the generator draws now has a sound channel rule, so its nets come out
    # correct; groups kept whole with a logged reason are checked in test_refusals_have_reasons
    assert seen.count("correct") >= 10, seen


@pytest.mark.parametrize("case", _regressions(), ids=lambda c: c["name"])
def test_regression(case: dict[str, Any]) -> None:
    """Shrunk examples that once failed, with the status they must have now."""
    out = netgen.check_spec(case["spec"])
    assert out.status == case["expect"], out.detail
    for needle in case.get("refusal_contains", []):
        assert any(needle in r for r in out.refusals), out.refusals


def test_seeded_specs_are_deterministic_and_valid() -> None:
    a, b = netgen.spec_from_seed(7), netgen.spec_from_seed(7)
    assert a == b and a != netgen.spec_from_seed(8)
    assert json.loads(json.dumps(a)) == a  # JSON-serialisable, so failures can be stored
    for seed in range(30):
        spec = netgen.spec_from_seed(seed)
        assert 2 <= len(spec["heads"]) <= 4
        net = netgen.GenNet(spec).eval()
        x = torch.randn(1, 3, spec["size"], spec["size"])
        out = net(x)
        assert sorted(out) == [f"t{i}" for i in range(len(spec["heads"]))]


def test_checker_flags_a_wrong_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The independent checks catch a route that computes something else."""
    import routesurgeon.surgeon as surgeon_mod

    real = surgeon_mod.Surgeon.export_routes

    def corrupt(self: Any, *args: Any, **kwargs: Any) -> Any:
        routes = real(self, *args, **kwargs)
        for r in routes.values():
            with torch.no_grad():
                next(iter(r.parameters())).mul_(1.5)
        return routes

    monkeypatch.setattr(surgeon_mod.Surgeon, "export_routes", corrupt)
    out = netgen.check_spec(netgen.spec_from_seed(0))
    assert out.status == "wrong" and "differs" in out.detail


class _OpaqueNet(torch.nn.Module):
    """``cumsum`` over channels has no channel rule: its input channels must be kept whole."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.ha = torch.nn.Linear(6, 2)
        self.hb = torch.nn.Conv2d(6, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = torch.relu(self.c2(torch.cumsum(torch.relu(self.c1(x)), 1)))
        return {"a": self.ha(y.mean((2, 3))), "b": self.hb(y)}


def test_refusals_have_reasons(caplog: pytest.LogCaptureFixture) -> None:
    import routesurgeon as rs

    with caplog.at_level(logging.INFO, logger="routesurgeon.channels"):
        s = rs.instrument(_OpaqueNet().eval(), torch.randn(2, 3, 8, 8))
    reasons, missing = netgen.refusals(s)
    assert not missing
    assert any("unknown channel semantics" in r and "cumsum" in r for r in reasons), reasons
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in reasons:  # every refusal is logged with its reason
        assert reason in logged, (reason, logged)
    routes = s.export_routes(keep=0.5, scores="magnitude")  # the rest still prunes, verified
    assert routes["a"].get_submodule("c1").out_channels == 4
    assert routes["a"].get_submodule("c2").out_channels < 6
