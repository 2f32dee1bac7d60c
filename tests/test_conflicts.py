"""The gradient-conflict monitor: per shared layer and task pair, cosine and norm ratio.

Checked against a slow reference (one forward and one ``torch.autograd.grad`` per task and per
layer, in float64) to 1e-6; the monitor inside the ``Trainer`` leaves training bit-identical;
per-epoch methods are sampled too; the CLI command and the report's heat map (in the headless
browser, as ``tests/test_viz.py`` does) show the figures; bad input is refused precisely.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import routesurgeon as rs
from routesurgeon.cli import main
from routesurgeon.conflicts import ConflictConfig, measure_conflicts, shared_layers
from routesurgeon.errors import InputError, LossError
from tests.conflictnet import LOSSES, Net, batches, surgeon


def _reference(model: nn.Module, data: list[Any]) -> dict[tuple[str, str, str], tuple]:
    """Slow and plain: per task and layer, a fresh forward and ``autograd.grad``, float64."""
    layers = {"c1": ("a", "b", "c"), "bn": ("a", "b", "c"), "c2": ("a", "b", "c"),
              "ab": ("a", "b")}
    grads: dict[tuple[str, str], torch.Tensor] = {}
    for layer, tasks in layers.items():
        params = list(getattr(model, layer).parameters())
        for t in tasks:
            acc = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
            for x, y in data:
                state = {k: v.clone() for k, v in model.state_dict().items()}
                loss = LOSSES[t](model(x)[t], y[t])
                g = torch.autograd.grad(loss, params)
                model.load_state_dict(state)  # the BN statistics as they were
                acc += torch.cat([v.reshape(-1) for v in g]).double()
            grads[(layer, t)] = acc / len(data)
    out = {}
    for layer, tasks in layers.items():
        for a, b in itertools.combinations(tasks, 2):
            ga, gb = grads[(layer, a)], grads[(layer, b)]
            out[(layer, a, b)] = (float(ga @ gb / (ga.norm() * gb.norm())),
                                  float(ga.norm() / gb.norm()))
    return out


def test_conflicts_match_per_task_autograd_grad_and_change_nothing() -> None:
    s = surgeon()
    data = batches()
    assert [(la.name, la.tasks) for la in shared_layers(s)] == [
        ("c1", ("a", "b", "c")), ("bn", ("a", "b", "c")), ("c2", ("a", "b", "c")),
        ("ab", ("a", "b"))]
    buffers = {k: v.clone() for k, v in s.model.named_buffers()}
    rng = torch.random.get_rng_state()
    c = s.conflicts(data, LOSSES)
    # nothing the model holds changed: BN statistics, .grad, the RNG
    for k, v in s.model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in s.model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)

    ref = _reference(s.model, data)
    assert c.layers == ("c1", "bn", "c2", "ab")
    assert c.pairs == (("a", "b"), ("a", "c"), ("b", "c"))
    for (layer, a, b), (cos, ratio) in ref.items():
        assert c.value(layer, a, b) == pytest.approx(cos, abs=1e-6), (layer, a, b)
        assert c.value(layer, b, a) == pytest.approx(cos, abs=1e-6)
        assert c.value(layer, a, b, "norm_ratio") == pytest.approx(ratio, rel=1e-6)
        assert c.value(layer, b, a, "norm_ratio") == pytest.approx(1 / ratio, rel=1e-6)
    assert any(v < 0 for v, _ in ref.values()) and any(v > 0 for v, _ in ref.values())
    # pairs that do not share a layer have no figure there
    assert torch.isnan(c.cosine[3, 1]) and torch.isnan(c.cosine[3, 2])
    summary = c.summary()
    assert summary["a|c"]["layers"] == 3 and summary["a|b"]["layers"] == 4
    rec = c.as_record()
    assert rec["cosine"][3][1] is None and rec["pairs"] == ["a|b", "a|c", "b|c"]
    json.dumps(rec, allow_nan=False)


def test_the_trainer_monitor_samples_without_changing_training() -> None:
    data = batches(4)
    plain = surgeon(1)
    ref = rs.Trainer(plain, torch.optim.SGD(plain.model_parameters(), lr=0.1),
                     method="drmgf-step", progress=False)
    ref.fit_epoch(data, LOSSES)
    s = surgeon(1)
    first = s.conflicts(data[:1], LOSSES)  # before any step
    tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), method="drmgf-step",
                    conflicts=2, progress=False)
    rec = tr.fit_epoch(data, LOSSES)
    for (k, v), w in zip(s.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(v, w), k  # bit-identical to training without the monitor
    assert [c["step"] for c in rec["conflicts"]] == [0, 2]
    assert rec["conflicts"][0]["cosine"] == first.as_record()["cosine"]
    assert rec["conflicts"][1]["cosine"] != first.as_record()["cosine"]  # the weights moved
    assert len(tr.observer.samples) == 2
    assert tr.observer.monitor is not None and tr.observer.monitor.every == 2
    # off by default without log_dir; a per-epoch method is sampled as it draws its batches
    assert rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1),
                      progress=False).observer.monitor is None
    tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), method="drmgf",
                    config={"cycle_steps": 2, "s_batches": 1}, conflicts=ConflictConfig(every=3),
                    progress=False)
    rec = tr.fit_epoch(data, LOSSES)  # 4 batches drawn from the loader: 0 and 3 sampled
    assert len(rec["conflicts"]) == 2 and rec["conflicts"][0]["layers"] == list(first.layers)


def test_bad_input_is_refused() -> None:
    s = surgeon()
    opt = torch.optim.SGD(s.model_parameters(), lr=0.1)
    with pytest.raises(InputError, match="conflicts must be True, False, None"):
        rs.Trainer(s, opt, conflicts="often", progress=False)
    with pytest.raises(ValueError, match="positive int"):
        ConflictConfig(every=0)
    with pytest.raises(LossError, match=r"missing \['c'\]"):
        s.conflicts(batches(1), {k: v for k, v in LOSSES.items() if k != "c"})
    x, y = batches(1)[0]
    with pytest.raises(LossError, match="no target for task 'b'"):
        s.conflicts([(x, {"a": y["a"], "c": y["c"]})], LOSSES)
    with pytest.raises(InputError, match="at least one batch"):
        measure_conflicts(s, [], LOSSES)
    with pytest.raises(InputError, match=r"no task pair \('a', 'z'\)"):
        s.conflicts((x, y), LOSSES).value("c1", "a", "z")


def test_cli_conflicts_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["conflicts", "timm:resnet18", "--input-size", "32", "--batch-size", "2",
            "--batches", "1"]
    assert main([*base, "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "routesurgeon.conflicts/1" and data["pairs"] == [
        "cls|aux", "cls|head2", "aux|head2"]
    assert len(data["layers"]) == 40 and data["losses"] == dict.fromkeys(
        ["cls", "aux", "head2"], "ce")
    vals = [v for row in data["cosine"] for v in row if v is not None]
    assert vals and all(-1 <= v <= 1 for v in vals)
    # a saved batch file with explicit losses; tables name the pairs; JSON is not overwritten
    s = surgeon()
    torch.save(batches(1), tmp_path / "b.pt")
    out = tmp_path / "c.json"
    out.write_text("{}")
    spec = ["conflicts", f"module:{__name__}:_net_spec", "--data", str(tmp_path / "b.pt"),
            "--loss", "ce,b=mse", "--json", str(out)]
    assert main(spec) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*spec, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "a vs b" in text and "conflicting" in text
    saved = json.loads(out.read_text())
    ref = s.conflicts(batches(1), LOSSES)
    assert saved["cosine"] == ref.as_record()["cosine"]
    assert main(["conflicts", f"module:{__name__}:_net_spec", "--data", "nope.pt"]) == 2
    assert "no such file" in capsys.readouterr().err


def _net_spec() -> Any:
    torch.manual_seed(0)
    return Net().train(), torch.randn(2, 3, 8, 8)


# -- the report ------------------------------------------------------------------------------------
def _trained_report(tmp: Path) -> tuple[Path, rs.Trainer]:
    s = surgeon(2)
    tr = rs.Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.05), method="pcgrad",
                    conflicts=2, progress=False)
    for _ in range(3):
        tr.fit_epoch(batches(4, seed=3), LOSSES)
    return s.report(tmp / "report.html", history=tr), tr


def test_report_shows_the_conflict_heat_map(tmp_path: Path) -> None:
    from routesurgeon.viz.browser import HeadlessChromium

    path, tr = _trained_report(tmp_path)
    samples = [c for h in tr.history for c in h["conflicts"]]
    assert [c["step"] for c in samples] == [0, 2, 4, 6, 8, 10]
    html = path.read_text()
    assert 'id="conflicts"' in html and 'href="#conflicts"' in html
    before = tr.surgeon.report(tmp_path / "none.html")
    assert 'id="conflicts"' not in before.read_text()  # nothing given, nothing shown
    with HeadlessChromium(width=1300, height=900) as br:
        load = br.open(path)
        assert load.errors == [] and load.external_requests == []
        # one cell per (layer, pair that shares it, sample): 3 full layers x 3 pairs + ab x 1
        n = int(br.evaluate("document.querySelectorAll('#conflict-heat rect.cc').length"))
        assert n == (3 * 3 + 1) * len(samples)
        red = int(br.evaluate("Array.from(document.querySelectorAll('#conflict-heat rect.cc'))"
                              ".filter(r => parseFloat(r.dataset.v) < 0).length"))
        negative = sum(v is not None and v < 0 for c in samples for row in c["cosine"]
                       for v in row)
        assert red == negative
        assert int(br.evaluate("document.querySelectorAll('#conflict-table tr').length")) == 4
        assert int(br.evaluate("document.querySelectorAll('#conflicts svg.chart').length")) == 1
        shot = br.screenshot(selector="#conflict-heat")
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 1000
