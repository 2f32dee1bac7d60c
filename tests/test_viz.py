"""The visual report: HTML in headless Chromium, static pictures, DOT, text tree, route graphs.

The browser tests need Debian's ``chromium`` (``bash scripts/install_browser.sh``) and
``websocket-client``; without them they fail, they are not skipped.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image  # comes with matplotlib

import routesurgeon as rs
from routesurgeon.errors import InputError, TaskError
from routesurgeon.viz import (
    load_route_graph,
    render_report,
    route_costs,
    route_graph,
    save_dot,
    save_heatmap,
    save_route_graph,
    save_topology,
    text_tree,
    to_dot,
)
from routesurgeon.viz.browser import HeadlessChromium

MAX_REPORT_BYTES = 5 * 1024 * 1024


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(1) == y).float().mean())


def _train(surgeon: rs.Surgeon, batches: list[Any], epochs: int) -> rs.Trainer:
    tr = rs.Trainer(
        surgeon,
        torch.optim.Adam(surgeon.model_parameters(), 1e-3),
        method="drmgf-step",
        progress=False,
    )
    losses = {t: F.cross_entropy for t in surgeon.tasks}
    for _ in range(epochs):
        tr.fit_epoch(batches, losses)
        tr.evaluate(batches, {t: _accuracy for t in surgeon.tasks})
    return tr


class Built:
    """A trained surgeon, its history, exported routes and the reports written for it."""

    def __init__(
        self,
        surgeon: rs.Surgeon,
        trainer: rs.Trainer,
        routes: dict[str, Any],
        before: Path,
        after: Path,
    ) -> None:
        self.surgeon, self.trainer, self.routes = surgeon, trainer, routes
        self.before, self.after = before, after


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # the CI machine has 2 cores shared by 2 workers: intra-op threads only spin
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def r50(tmp_path_factory: pytest.TempPathFactory) -> Built:
    torch.manual_seed(0)
    b = rs.build_model("timm:resnet50", input_size=64)
    s = rs.instrument(b.model, b.example_inputs, tasks=b.tasks)
    d = tmp_path_factory.mktemp("r50")
    before = s.report(d / "before.html")  # topology only
    x = torch.randn(4, 3, 64, 64)
    y = {t: torch.randint(0, 10, (4,)) for t in s.tasks}
    tr = _train(s, [(x, y)], epochs=2)
    routes = s.export_routes(keep=0.5)  # learned importance
    after = s.report(d / "after.html", history=tr, routes=routes)
    return Built(s, tr, routes, before, after)


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> Built:
    torch.manual_seed(0)
    b = rs.build_model("smp:Unet:resnet34", aux_classes=4, num_classes=3, input_size=64)
    s = rs.instrument(b.model, b.example_inputs, tasks=b.tasks)
    assert s.tasks == ["mask", "label"]
    d = tmp_path_factory.mktemp("unet")
    before = s.report(d / "before.html")
    x = torch.randn(2, 3, 64, 64)
    y = {"mask": torch.randint(0, 3, (2, 64, 64)), "label": torch.randint(0, 4, (2,))}
    tr = _train(s, [(x, y)], epochs=1)
    routes = s.export_routes(keep=0.5)
    after = s.report(d / "after.html", history=tr.history, routes=routes)
    return Built(s, tr, routes, before, after)


@pytest.fixture(scope="module")
def browser() -> Iterator[HeadlessChromium]:
    # No skip: a missing chromium or websocket-client must fail the suite in CI.
    with HeadlessChromium(width=1400, height=900) as br:
        yield br


def _count(br: HeadlessChromium, selector: str) -> int:
    return int(br.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length"))


def _png(data: bytes) -> Any:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).convert("RGB")


def _ink(img: Any) -> float:
    """Fraction of pixels that are not (near) white."""
    grey = img.convert("L")
    hist = grey.histogram()
    return 1 - sum(hist[245:]) / (img.width * img.height)


def _colours(img: Any) -> int:
    return len(img.getcolors(maxcolors=1 << 20) or [])


def _open_clean(br: HeadlessChromium, path: Path) -> Any:
    load = br.open(path)
    assert load.errors == [], f"console errors in {path.name}: {load.errors}"
    assert load.external_requests == [], f"{path.name} loads {load.external_requests}"
    assert br.evaluate("document.documentElement.getAttribute('data-ready')") == "1"
    return load


# -- HTML report in the browser --------------------------------------------------------------------
def test_resnet50_report_before_training_shows_topology_only(
    r50: Built, browser: HeadlessChromium
) -> None:
    _open_clean(browser, r50.before)
    assert _count(browser, "#graph-canvas svg .blk") >= 20
    assert _count(browser, "#imp-heat") == 0  # nothing learned yet
    assert _count(browser, "#routes") == 0
    assert _count(browser, "#training") == 0


def test_resnet50_report_renders_graph_heatmap_routes_and_curves(
    r50: Built, browser: HeadlessChromium
) -> None:
    size = r50.after.stat().st_size
    assert size < MAX_REPORT_BYTES, f"report is {size / 1e6:.2f} MB"
    load = _open_clean(browser, r50.after)
    print(
        f"\nresnet50 report: {size / 1e6:.2f} MB, load event after "
        f"{load.timing['load']:.0f} ms, first contentful paint "
        f"{load.timing['firstContentfulPaint']:.0f} ms"
    )
    s = r50.surgeon
    # graph: module blocks of all three tasks, shared blocks marked with a badge
    blocks = _count(browser, "#graph-canvas svg .blk")
    assert 20 <= blocks <= 80
    for i in range(3):
        assert _count(browser, f"#graph-canvas .blk.in-t{i}") >= 20
    assert _count(browser, "#graph-canvas .badge") >= 15
    assert _count(browser, "#graph-canvas path.edge") >= blocks - 1
    # heat map: one cell per (shared layer, task) with learned importance
    imp = s.importance()
    assert _count(browser, "#imp-heat rect.hc") == sum(len(per) for per in imp.values())
    fills = browser.evaluate(
        "Array.from(document.querySelectorAll('#imp-heat rect.hc'))"
        ".map(r => r.getAttribute('fill'))"
    )
    assert len(set(fills)) >= 2  # the colours follow the (trained, unequal) importance
    # routes table: one row per task; curves: a loss and a metric chart per task
    assert _count(browser, "#routes tr") == 1 + len(s.tasks)
    assert _count(browser, "#training .tcard") == len(s.tasks)
    assert _count(browser, "#training svg.chart") == 2 * len(s.tasks)
    # the pixels: graph and heat map are drawn, not empty boxes
    graph = _png(browser.screenshot(selector="#graph-canvas svg"))
    assert graph.width > 600 and graph.height > 200
    assert _ink(graph) > 0.05 and _colours(graph) > 50
    heat = _png(browser.screenshot(selector="#imp-heat"))
    assert _ink(heat) > 0.2 and _colours(heat) > 20
    page = _png(browser.screenshot())
    assert _ink(page) > 0.1 and _colours(page) > 100


def test_resnet50_report_interactions(r50: Built, browser: HeadlessChromium) -> None:
    _open_clean(browser, r50.after)
    br = browser
    click = (
        "(sel => { const e = document.querySelector(sel); e.dispatchEvent("
        "new MouseEvent('click', {bubbles: true})); return true; })"
    )
    # depth switch swaps the graph for another view
    n3 = _count(br, "#graph-canvas .blk")
    br.evaluate(click + "('#depth-btns button[data-d=\"1\"]')")
    assert _count(br, "#graph-canvas .blk") < n3
    # focus a task: its route bars become visible
    br.evaluate(click + "('#focus-btns button[data-t=\"1\"]')")
    assert br.evaluate("document.getElementById('graph').dataset.route") == "1"
    shown = br.evaluate(
        "Array.from(document.querySelectorAll('#graph-canvas .rt1'))"
        ".filter(e => getComputedStyle(e).display !== 'none').length"
    )
    assert shown >= 1
    # drill into an expandable block: its inside view and layer table appear
    br.evaluate(click + "('#depth-btns button[data-d=\"3\"]')")
    br.evaluate(click + "('#graph-canvas .blk.x')")
    assert br.evaluate("document.getElementById('drill').hidden") is False
    assert _count(br, "#drill-body svg .blk") >= 3
    assert _count(br, "#drill-body table tr") >= 2
    # per-channel view follows the chosen layer
    layer, n = br.evaluate(
        "(() => { const s = document.getElementById('layer-sel');"
        " s.selectedIndex = 5; s.dispatchEvent(new Event('change'));"
        " return [s.value, JSON.parse(document.getElementById('rs-data')"
        ".textContent).ch[s.value].n]; })()"
    )
    assert n == len(r50.surgeon.importance()[layer]["cls"])
    width = br.evaluate("document.getElementById('ch-canvas').width")
    assert width % n == 0 and width >= n
    assert f"{n} channels" in br.evaluate("document.getElementById('ch-stats').textContent")
    # normalising per task recolours the heat map
    before = br.evaluate(
        "Array.from(document.querySelectorAll('#imp-heat .hc'))"
        ".map(r => r.getAttribute('fill')).join()"
    )
    br.evaluate(
        "(() => { const c = document.getElementById('heat-norm'); c.checked = true;"
        " c.dispatchEvent(new Event('change')); })()"
    )
    after = br.evaluate(
        "Array.from(document.querySelectorAll('#imp-heat .hc'))"
        ".map(r => r.getAttribute('fill')).join()"
    )
    assert after != before
    # evolution over epochs: one canvas per task, epochs x layers
    assert _count(br, "#evo-heats canvas") == 3
    assert br.evaluate("document.getElementById('evo-c0').height") == len(r50.trainer.history)
    assert br.evaluate("window.__rsErr.length") == 0


def test_unet_with_aux_head_report_renders(unet: Built, browser: HeadlessChromium) -> None:
    assert unet.after.stat().st_size < MAX_REPORT_BYTES
    _open_clean(browser, unet.before)
    assert _count(browser, "#graph-canvas svg .blk") >= 20
    _open_clean(browser, unet.after)
    # decoder blocks serve only the mask, encoder blocks both tasks
    assert _count(browser, "#graph-canvas .blk.in-t0:not(.in-t1)") >= 5
    assert _count(browser, "#graph-canvas .blk.in-t0.in-t1") >= 10
    imp = unet.surgeon.importance()
    assert _count(browser, "#imp-heat rect.hc") == sum(len(per) for per in imp.values())
    graph = _png(browser.screenshot(selector="#graph-canvas svg"))
    assert _ink(graph) > 0.05 and _colours(graph) > 50
    heat = _png(browser.screenshot(selector="#imp-heat"))
    assert _ink(heat) > 0.2


# -- report content without a browser ------------------------------------------------------------
def test_report_is_deterministic_and_offline(r50: Built) -> None:
    s = r50.surgeon
    a = render_report(s.topology, s.route_scores(), r50.trainer.history)
    b = render_report(s.topology, s.route_scores(), r50.trainer.history)
    assert a == b
    for needle in ("http://", "https://", "<link", "src="):
        assert needle not in a.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_route_costs_shrink_with_the_route(r50: Built) -> None:
    costs = route_costs(r50.surgeon, r50.routes, repeats=1)
    assert set(costs) == set(r50.surgeon.tasks)
    for t, c in costs.items():
        route = r50.routes[t]
        assert c["params"] == sum(p.numel() for p in route.parameters())
        assert 0 < c["params"] < c["full_params"]
        assert 0 < c["flops"] < c["full_flops"]
        assert c["latency_ms"] > 0 and c["full_latency_ms"] > 0
        assert 0.3 < c["kept_fraction"] < 0.7
        assert all(0 < c["kept"][k] <= c["channels"][k] for k in c["channels"])


def test_report_input_errors(r50: Built, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"history must be a Trainer"):
        r50.surgeon.report(tmp_path / "r.html", history=[1, 2])
    with pytest.raises(InputError, match=r"not a mix"):
        r50.surgeon.report(
            tmp_path / "r.html", routes={"cls": r50.routes["cls"], "aux": {"params": 1}}
        )


# -- static pictures, DOT, text tree -------------------------------------------------------------
def test_static_heatmap_and_topology_png(r50: Built, tmp_path: Path) -> None:
    s = r50.surgeon
    heat = save_heatmap(s, tmp_path / "heat.png")
    img = _png(heat.read_bytes())
    assert img.height > 300 and _ink(img) > 0.2 and _colours(img) > 20
    layer = next(iter(s.importance()))
    per_channel = _png(save_heatmap(s, tmp_path / "ch.png", layer=layer).read_bytes())
    assert _ink(per_channel) > 0.2
    topo = _png(save_topology(s, tmp_path / "topo.png").read_bytes())
    assert topo.width > 800 and _ink(topo) > 0.05 and _colours(topo) > 50
    svg = save_topology(s, tmp_path / "topo.svg").read_text()
    assert svg.count("<path") > 20
    with pytest.raises(InputError, match=r"unsupported image format"):
        save_heatmap(s, tmp_path / "heat.bmp")
    with pytest.raises(InputError, match=r"has no importance"):
        save_heatmap(s, tmp_path / "x.png", layer="no.such.layer")


def test_dot_and_text_tree(r50: Built, tmp_path: Path) -> None:
    s = r50.surgeon
    dot = to_dot(s)
    assert dot.startswith("digraph routesurgeon {") and dot.rstrip().endswith("}")
    assert 'style="striped"' in dot  # shared blocks
    assert dot.count("->") >= 20
    written = save_dot(s, tmp_path / "topo.svg")
    assert written[0].suffix == ".dot" and written[0].read_text() == dot
    if shutil.which("dot"):
        assert written[1].read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        assert written == [tmp_path / "topo.dot"]
    tree = text_tree(s)
    lines = tree.splitlines()
    assert lines[0] == "tasks: 1=cls  2=aux  3=head2"
    assert any("backbone" in ln and "[123]" in ln and "shared by 3" in ln for ln in lines)
    assert any("cls" in ln and "[1··]" in ln for ln in lines)  # the cls head is exclusive
    assert "[·2·]" in text_tree(s, depth=2)
    assert "|-- " in text_tree(s, ascii=True)


# -- route graphs as data ------------------------------------------------------------------------
def test_route_graph_roundtrips_json_and_graphml(r50: Built, tmp_path: Path) -> None:
    s = r50.surgeon
    route = r50.routes["aux"]
    g = route_graph(s, "aux", route)
    assert nx.is_directed_acyclic_graph(g)
    assert all(
        "aux" in d["tasks"] for _, d in g.nodes(data=True) if d["kind"] not in ("input", "output")
    )
    assert not any(d.get("layer") == "heads.cls" for _, d in g.nodes(data=True))
    layers = [d for _, d in g.nodes(data=True) if "kept" in d]
    assert layers and all(d["kept_channels"] == len(d["kept"]) <= d["channels"] for d in layers)
    assert g.graph["kept_fraction"] < 1.0
    full = route_graph(s, "aux")
    assert not any("kept" in d for _, d in full.nodes(data=True))
    for suffix in ("json", "graphml"):
        back = load_route_graph(save_route_graph(g, tmp_path / f"aux.{suffix}"))
        assert set(back.nodes) == set(g.nodes) and set(back.edges) == set(g.edges)
        assert back.graph["task"] == "aux" and back.graph["tasks"] == s.tasks
        for n, d in g.nodes(data=True):  # GraphML has no null: None attributes are left out
            got = {k: v for k, v in back.nodes[n].items() if v is not None}
            assert got == {k: v for k, v in d.items() if v is not None}, n
    with pytest.raises(InputError, match=r"not 'cls''s"):
        route_graph(s, "cls", route)
    with pytest.raises(TaskError, match=r"unknown task"):
        route_graph(s, "nope")
    with pytest.raises(InputError, match=r"use \.json or \.graphml"):
        save_route_graph(g, tmp_path / "aux.txt")
    (tmp_path / "other.json").write_text(json.dumps(nx.node_link_data(nx.DiGraph(), edges="edges")))
    with pytest.raises(InputError, match=r"not a routesurgeon route graph"):
        load_route_graph(tmp_path / "other.json")
