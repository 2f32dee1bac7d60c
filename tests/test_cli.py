"""The ``routesurgeon`` command line, run in-process on real small timm/smp models."""

from __future__ import annotations

import importlib
import json
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

import routesurgeon as rs
from routesurgeon.cli import main
from routesurgeon.saving import load_route, read_manifest
from routesurgeon.topology import Topology
from routesurgeon.viz import text_tree

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.block = nn.Conv2d(8, 16, 3, padding=1, stride=2)
            self.head_a = nn.Linear(16, 4)
            self.head_b = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            y = torch.relu(self.block(self.stem(x)))
            return self.head_a(y.mean((2, 3))), self.head_b(y)


    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return torch.tensor(float(x.sum().item() > 0)) * self.c(x)


    def make():
        torch.manual_seed(0)
        return Net().eval(), torch.randn(2, 3, 16, 16)


    def bad():
        return Untraceable(), torch.randn(2, 3, 8, 8)
    """
)


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "rs_cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rs_cli_factory", None)
    return "module:rs_cli_factory"


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_inspect_timm_table_json_graphml_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    js, gml, tj = tmp_path / "s.json", tmp_path / "g.graphml", tmp_path / "t.json"
    code = main(
        [
            "inspect",
            "timm:resnet18",
            "--input-size",
            "64",
            "--json",
            str(js),
            "--graphml",
            str(gml),
            "--topology-json",
            str(tj),
            "--tree",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "timm:resnet18 (MultiHead): sharing by task" in out
    assert "traced by fx on input 2x3x64x64" in out

    data = json.loads(js.read_text())
    assert data["tasks"] == ["cls", "aux", "head2"]
    # every parameter of the backbone is shared; each head is its task's own
    built = rs.build_model("timm:resnet18", input_size=64)
    backbone, heads = built.model.backbone, built.model.heads
    for t in data["tasks"]:
        row = data["per_task"][t]
        assert row["params"] == _params(backbone) + _params(heads[t])
        assert row["exclusive_layers"] == 1
        assert row["shared_layers"] == row["layers"] - 1
        assert 0.99 < row["shared_filter_fraction"] < 1.0  # all but the head's 10 outputs
        assert f"{row['layers']}" in out
    assert data["totals"]["params"] == _params(built.model)
    assert data["totals"]["shared_layers"] == data["totals"]["layers"] - 3

    # GraphML loads with networkx and back into a Topology with the same summary
    g = nx.read_graphml(gml)
    assert g.number_of_nodes() == data["totals"]["nodes"]
    topo = Topology.from_graphml(gml)
    summary = topo.summary()
    for t in data["tasks"]:
        want = {k: v for k, v in data["per_task"][t].items() if k != "channels"}
        assert summary[t] == pytest.approx(want)
    # the printed tree is routesurgeon.viz.text_tree of this topology
    tree = text_tree(Topology.from_json(tj))
    assert tree.strip() and tree in out
    assert "backbone" in tree and "layer4" in tree


def test_inspect_features_only_json_to_stdout_with_task_subset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "inspect",
            "timm:mobilenetv3_small_100",
            "--features-only",
            "--input-size",
            "64",
            "--tasks",
            "stage0,stage2,stage4",
            "--json",
            "-",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)  # nothing but JSON on stdout
    assert data["format"] == "routesurgeon.inspect/1"
    assert data["tasks"] == ["stage0", "stage2", "stage4"]
    assert data["trace"]["path"].startswith("fx")
    assert data["trace"]["seconds"]["total"] > 0
    rows = [data["per_task"][t] for t in data["tasks"]]
    # a deeper stage reaches everything a shallower one does, and more
    assert [r["params"] for r in rows] == sorted(r["params"] for r in rows)
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"]
    assert rows[2]["flop_share"] == pytest.approx(1.0)
    assert rows[0]["shared_filter_fraction"] == pytest.approx(1.0)  # stage0 is inside the others


def test_inspect_smp_unet_with_aux_head(capsys: pytest.CaptureFixture[str]) -> None:
    import segmentation_models_pytorch as smp

    code = main(
        ["inspect", "smp:Unet:resnet18", "--aux-classes", "3", "--input-size", "64", "--json", "-"]
    )
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["tasks"] == ["mask", "label"]
    model = smp.Unet("resnet18", encoder_weights=None, classes=10, aux_params={"classes": 3})
    label, mask = data["per_task"]["label"], data["per_task"]["mask"]
    assert label["params"] == _params(model.encoder) + _params(model.classification_head)
    assert mask["params"] == (
        _params(model.encoder) + _params(model.decoder) + _params(model.segmentation_head)
    )
    assert label["exclusive_layers"] == 1  # the aux linear
    assert data["totals"]["params"] == _params(model)


def test_module_factory_table_and_tree(factory: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", f"{factory}:make", "--tasks", "cls,seg", "--tree"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Net" in out and "cls" in out and "seg" in out
    assert "stem" in out and "head_a" in out  # the module tree


def test_leaf_modules_by_path_and_class(factory: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", f"{factory}:make", "--json", "-"]) == 0
    plain = json.loads(capsys.readouterr().out)["totals"]["layers"]
    assert main(["inspect", f"{factory}:make", "--json", "-", "--leaf-modules", "stem"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["layers"] == plain - 1  # stem: one op
    assert (
        main(["inspect", f"{factory}:make", "--json", "-", "--leaf-modules", "torch.nn.Sequential"])
        == 0
    )  # by class: the stem is the only Sequential
    assert json.loads(capsys.readouterr().out)["totals"]["layers"] == plain - 1


def test_python_dash_m(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["routesurgeon", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("routesurgeon", run_name="__main__")
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"routesurgeon {rs.__version__}"


def test_viz_writes_offline_html(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r" / "report.html"
    assert main(["viz", f"{factory}:make", "--out", str(path)]) == 0
    html = path.read_text()
    assert "<svg" in html and "head_a" in html
    assert 'id="training"' not in html and 'id="imp-heat"' not in html  # nothing trained
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing fetched
    assert str(path) in capsys.readouterr().out
    # refuses to overwrite without --overwrite
    assert main(["viz", f"{factory}:make", "--out", str(path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_export_keep_all_needs_no_scores(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "routes"
    argv = ["export", f"{factory}:make", "--tasks", "cls,seg", "--keep", "1.0", "--scores",
            "importance",
            "--latency-repeats", "1", "--formats", "pt", "--out", str(out)]
    assert main(argv) == 0  # untrained, no checkpoint: keep 1.0 keeps every reached channel
    assert "routes (keep 1.0, scores importance)" in capsys.readouterr().out
    assert read_manifest(out / "cls")["selection"]["keep"] == 1.0


@pytest.mark.parametrize("scores", ["group-magnitude", "random"])
def test_export_takes_the_data_free_criteria(
    scores: str, factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "routes"
    argv = ["export", f"{factory}:make", "--tasks", "cls,seg", "--keep", "0.5", "--scores",
            scores, "--latency-repeats", "1", "--formats", "pt", "--out", str(out)]
    assert main(argv) == 0
    assert f"routes (keep 0.5, scores {scores})" in capsys.readouterr().out
    m = read_manifest(out / "cls")
    assert 0 < m["params"] < m["full_model"]["params"]  # pruned by that criterion, verified


def test_export_saves_verified_routes_and_refuses_overwrite(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "routes"
    argv = [
        "export",
        f"{factory}:make",
        "--tasks",
        "cls,seg",
        "--keep",
        "0.5",
        "--union",
        "--latency-repeats",
        "1",
        "--formats",
        "pt2",
        "--out",
        str(out),
    ]  # ONNX: slow
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "routes (keep 0.5, scores magnitude)" in text
    _, x = importlib.import_module("rs_cli_factory").make()
    for t in ("cls", "seg"):
        m = read_manifest(out / t)
        assert m["tasks"] == [t] and m["selection"]["keep"] == 0.5
        assert m["source"]["spec"] == f"{factory}:make"
        assert 0 < m["params"] < m["full_model"]["params"]
        assert set(m["files"]) >= {"pt", "pt2"} and "onnx" not in m["files"]
        assert f"saved {t}: {out / t}" in text
        route = load_route(out / t)  # checks hashes and the stored outputs
        assert route(x).shape[0] == 2
    assert read_manifest(out / "cls_seg")["tasks"] == ["cls", "seg"]  # the union route
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--formats", "pt"]) == 0
    assert "pt2" not in read_manifest(out / "cls")["files"]  # replaced, nothing stale left
    assert not (out / "cls" / "route.pt2").exists()
    # a threshold every magnitude passes keeps every channel: cls loses only seg's 1x1 head
    everything = tmp_path / "all"
    assert (
        main(
            [
                "export",
                f"{factory}:make",
                "--tasks",
                "cls,seg",
                "--threshold",
                "0",
                "--formats",
                "pt",
                "--latency-repeats",
                "1",
                "--out",
                str(everything),
            ]
        )
        == 0
    )
    m = read_manifest(everything / "cls")
    assert m["selection"]["threshold"] == 0 and m["selection"]["keep"] is None
    assert m["params"] == m["full_model"]["params"] - (16 * 2 + 2)
    assert all(len(v["kept"]) == v["channels"] for v in m["layers"].values())


def test_viz_with_checkpoint_shows_importance_history_and_routes(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, x = importlib.import_module("rs_cli_factory").make()
    s = rs.instrument(model, x, tasks=["cls", "seg"])
    trainer = rs.Trainer(
        s, torch.optim.Adam(s.model_parameters(), 1e-2), method="drmgf-step", progress=False
    )
    batch = (x, {"cls": torch.tensor([0, 3]), "seg": torch.randn(2, 2, 8, 8)})
    trainer.fit_epoch([batch, batch], {"cls": F.cross_entropy, "seg": F.mse_loss})
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(str(ckpt))
    path = tmp_path / "report.html"
    assert (
        main(
            [
                "viz",
                f"{factory}:make",
                "--tasks",
                "cls,seg",
                "--checkpoint",
                str(ckpt),
                "--keep",
                "0.5",
                "--out",
                str(path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "learned importance, training history (1 epochs), 2 routes" in out
    html = path.read_text()
    assert 'id="training"' in html and 'id="imp-heat"' in html and 'id="routes"' in html
    # a checkpoint of other tasks is refused with the checkpoint's reason
    assert (
        main(
            [
                "viz",
                f"{factory}:make",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp_path / "other.html"),
            ]
        )
        == 2
    )
    assert "checkpoint" in capsys.readouterr().err


def test_methods_lists_registry_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(data) == rs.available_methods()
    assert all(desc.strip() for desc in data.values())
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "drmgf-step" in out and "pcgrad" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["inspect", "resnet18"],
            r"cannot read model spec 'resnet18'; use timm:NAME.*did you mean timm:resnet18\?",
        ),
        (["inspect", "timm:resnet_nope"], r"timm has no model 'resnet_nope'"),
        (["inspect", "timm:resnet5O"], r"timm has no model 'resnet5O'; did you mean timm:resnet50"),
        (["inspect", "smp:Unet"], r"cannot read model spec 'smp:Unet'"),
        (
            ["inspect", "smp:Unet:resnet34x"],
            r"smp has no encoder 'resnet34x'; did you mean "
            r"resnet34.*tu-NAME",
        ),
        (["inspect", "smp:Unett:resnet34"], r"smp has no architecture 'Unett'; use one of .*Unet"),
        (["inspect", "module:no_such_pkg_xyz:make"], r"cannot import 'no_such_pkg_xyz'"),
        (["inspect", "{factory}:make", "--tasks", "a,b,c"], r"task 'a' matches no output"),
        (
            ["inspect", "{factory}:make", "--leaf-modules", "nope.Missing"],
            r"--leaf-modules 'nope.Missing' is neither a submodule path",
        ),
        (
            ["inspect", "{factory}:bad"],
            r"could not trace Untraceable: module '<root>'.*"
            r"What to do: .*--leaf-modules",
        ),
        (
            ["export", "{factory}:make", "--scores", "importance", "--out", "x"],
            r"--scores importance needs --checkpoint",
        ),
        (
            ["viz", "{factory}:make", "--checkpoint", "missing.ckpt", "--out", "x.html"],
            r"--checkpoint 'missing.ckpt' is not a file",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    argv: list[str], message: str, factory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{factory}", factory) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"routesurgeon {argv[0]}: error: ")
    assert re.search(message, err), err


def test_debug_shows_the_exception(factory: str) -> None:
    with pytest.raises(rs.TracingError, match=r"could not trace Untraceable"):
        main(["inspect", f"{factory}:bad", "--debug"])


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["export", "timm:resnet18", "--keep", "1.5", "--out", "x"]) == 2
    assert "--keep takes a fraction in (0, 1]" in capsys.readouterr().err
    assert main(["inspect", "timm:resnet18", "--input-size", "big"]) == 2


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "routesurgeon"
    done = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    for command in ("inspect", "export", "viz", "methods"):
        assert command in done.stdout
