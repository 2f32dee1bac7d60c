"""Saving routes (torch.save, torch.export, ONNX) and loading them back, verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import routesurgeon as rs
from routesurgeon.errors import CheckpointError, ExportError, InputError, TaskError
from routesurgeon.report import count_flops, count_params
from routesurgeon.saving import load_route, read_manifest, save_routes


def _out(route: object, x: torch.Tensor) -> object:
    with torch.no_grad():
        return route(x)  # type: ignore[operator]


def test_save_and_load_every_format(net: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    s = rs.instrument(net, x)
    routes = s.export_routes(keep=0.5, scores="magnitude", tasks=["a", "d"])
    paths = save_routes(routes, tmp_path, surgeon=s, source="tests.conftest:TwoHeadNet")
    assert set(paths) == {"a", "d"}
    for t, route in routes.items():
        m = read_manifest(tmp_path, t)
        mask = route.meta["routesurgeon"].mask
        assert m["tasks"] == [t] and not m["union"]
        assert m["routesurgeon_version"] == rs.__version__
        assert m["source"]["spec"] == "tests.conftest:TwoHeadNet"
        assert m["source"]["model_class"].endswith("TwoHeadNet")
        assert m["params"] == count_params(route) < m["full_model"]["params"]
        assert m["flops"] == count_flops(route, [x]) < m["full_model"]["flops"]
        assert m["layers"]["c2"]["channels"] == 16
        assert m["layers"]["c2"]["kept"] == mask.kept["c2"].tolist()
        assert m["verification"]["tolerance"] == 1e-5
        assert m["files"]["pt2"]["status"] == "saved"
        assert m["files"]["onnx"]["status"] == "verified", m["files"]["onnx"]
        want = _out(route, x)
        for fmt in ("pt", "pt2", "onnx"):
            got = _out(load_route(tmp_path, t, format=fmt), x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_union_route_saves_as_one_multi_output_model(net: nn.Module, x: torch.Tensor,
                                                     tmp_path: Path) -> None:
    s = rs.instrument(net, x)
    union = s.export_routes(keep=0.5, scores="magnitude", tasks=["a", "b"], union=True)
    paths = save_routes(union, tmp_path, surgeon=s, formats=("pt", "pt2"))
    assert list(paths) == ["a+b"]
    m = read_manifest(tmp_path, "a+b")
    assert m["union"] and m["tasks"] == ["a", "b"] and "onnx" not in m["files"]
    got = _out(load_route(tmp_path, "a+b", format="pt2"), x)
    assert isinstance(got, dict) and set(got) == {"a", "b"}
    want = _out(union, x)
    for t in want:
        torch.testing.assert_close(got[t], want[t], rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"without format 'onnx'"):
        load_route(tmp_path, "a+b", format="onnx")


def test_refuses_to_overwrite(net: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    s = rs.instrument(net, x)
    routes = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])
    save_routes(routes, tmp_path, formats=("pt",))
    saved = (tmp_path / "a" / "route.pt").read_bytes()
    other = s.export_routes(keep=1.0, scores="magnitude", tasks=["a"])
    with pytest.raises(FileExistsError, match=r"refusing to overwrite.*overwrite=True"):
        save_routes(other, tmp_path, formats=("pt",))
    assert (tmp_path / "a" / "route.pt").read_bytes() == saved
    save_routes(other, tmp_path, formats=("pt",), overwrite=True)
    assert read_manifest(tmp_path, "a")["selection"]["keep"] == 1.0
    assert count_params(load_route(tmp_path, "a")) == count_params(other["a"])


def test_load_detects_tampering(net: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    s = rs.instrument(net, x)
    routes = s.export_routes(keep=0.5, scores="magnitude", tasks=["a", "b"])
    save_routes(routes, tmp_path, formats=("pt",))
    a, b = tmp_path / "a", tmp_path / "b"
    # a changed file: the hash no longer matches
    (a / "route.pt").write_bytes((a / "route.pt").read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"SHA-256"):
        load_route(tmp_path, "a")
    # another route with a forged manifest hash: it does not reproduce the saved outputs
    (a / "route.pt").write_bytes((b / "route.pt").read_bytes())
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["files"]["pt"]["sha256"] = read_manifest(b)["files"]["pt"]["sha256"]
    (a / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"output shape|differs from its saved outputs"):
        load_route(tmp_path, "a")
    (a / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"not valid JSON"):
        load_route(tmp_path, "a")
    with pytest.raises(TaskError, match=r"no saved route"):
        load_route(tmp_path, "zz")


def test_failed_onnx_export_is_recorded(net: nn.Module, x: torch.Tensor, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    s = rs.instrument(net, x)
    routes = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported op aten::foo")

    monkeypatch.setattr(torch.onnx, "export", broken)
    save_routes(routes, tmp_path, formats=("pt", "onnx"))
    entry = read_manifest(tmp_path, "a")["files"]["onnx"]
    assert entry["status"] == "failed" and "aten::foo" in entry["error"]
    with pytest.raises(CheckpointError, match=r"aten::foo"):
        load_route(tmp_path, "a", format="onnx")
    assert isinstance(load_route(tmp_path, "a", format="pt"), torch.fx.GraphModule)


def test_bad_save_input(net: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    s = rs.instrument(net, x)
    routes = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])
    with pytest.raises(InputError, match=r"formats"):
        save_routes(routes, tmp_path, formats=("pt", "tflite"))
    plain = torch.fx.symbolic_trace(nn.Linear(3, 2))
    with pytest.raises(ExportError, match=r"no routesurgeon metadata"):
        save_routes({"a": plain}, tmp_path)
    with pytest.raises(InputError, match=r"format must be one of"):
        load_route(tmp_path, "a", format="tflite")


def test_real_model_route_round_trip(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    b = rs.build_model("timm:resnet18", input_size=64)
    s = rs.instrument(b.model, b.example_inputs, tasks=b.tasks)
    routes = s.export_routes(keep=0.5, scores="magnitude", tasks=["cls"])
    save_routes(routes, tmp_path, surgeon=s, source=b.spec)
    m = read_manifest(tmp_path, "cls")
    assert m["files"]["onnx"]["status"] == "verified"
    assert m["source"]["spec"] == b.spec
    assert m["params"] < 0.5 * m["full_model"]["params"]
    x = s.example_inputs()[0]
    want = _out(routes["cls"], x)
    for fmt in ("pt", "pt2", "onnx"):
        torch.testing.assert_close(_out(load_route(tmp_path, "cls", format=fmt), x), want,
                                   rtol=1e-4, atol=1e-5)
