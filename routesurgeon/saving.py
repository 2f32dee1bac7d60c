"""Saving exported routes and loading them back, verified.

``save_routes`` writes, per route, a directory ``<directory>/<route name>/`` with

- ``route.pt``: ``torch.save`` of the GraphModule (load with ``weights_only=False``: it is code),
- ``route.pt2``: a ``torch.export`` program (``torch.export.save``),
- ``route.onnx``: ONNX from that program, run by onnxruntime and compared with the route,
- ``check.pt``: the example inputs and the route's outputs on them (tensors only),
- ``manifest.json``: kept channels per layer, params, FLOPs, source model, routesurgeon version,
  how the route was verified, and per file its SHA-256 or, when an exporter failed, why.

Nothing is overwritten unless ``overwrite=True``. ``load_route`` checks the manifest, the file
hashes and that the loaded route reproduces the stored outputs within the recorded tolerance.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from routesurgeon._version import __version__
from routesurgeon.errors import CheckpointError, ExportError, InputError, TaskError
from routesurgeon.export import relative_error
from routesurgeon.report import count_flops, count_params
from routesurgeon.routes import RouteInfo

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["FORMATS", "OnnxRoute", "load_route", "read_manifest", "save_routes"]

FORMATS = ("pt", "pt2", "onnx")
FORMAT_VERSION = 1
_FILES = {"pt": "route.pt", "pt2": "route.pt2", "onnx": "route.onnx"}
_CHECK, _MANIFEST = "check.pt", "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _info(name: str, route: nn.Module) -> RouteInfo:
    info = getattr(route, "meta", {}).get("routesurgeon") if isinstance(route, fx.GraphModule) \
        else None
    if not isinstance(info, RouteInfo):
        raise ExportError(f"route {name!r} carries no routesurgeon metadata "
                          f"(route.meta['routesurgeon']); save routes returned by "
                          f"Surgeon.export_routes")
    return info


def _max_rel(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    if len(got) != len(want):
        raise CheckpointError(f"{len(got)} outputs where {len(want)} were saved")
    errs = []
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise CheckpointError(f"output shape {tuple(g.shape)} where {tuple(w.shape)} was saved")
        errs.append(relative_error(g.detach().cpu(), w.detach().cpu()))  # any device
    return max(errs, default=0.0)


class OnnxRoute:
    """An ONNX route run by onnxruntime; called like the route (tensors in, same structure out)."""

    def __init__(self, path: Path, out_spec: pytree.TreeSpec) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.out_spec = out_spec

    def __call__(self, *inputs: torch.Tensor) -> Any:
        names = [i.name for i in self.session.get_inputs()]
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        if len(names) != len(tensors):
            raise InputError(f"the ONNX route takes {len(names)} tensor inputs {names}, "
                             f"got {len(tensors)}")
        feed = {n: x.detach().cpu().numpy() for n, x in zip(names, tensors)}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]
        return pytree.tree_unflatten(outs, self.out_spec)


def _export_pt2(route: fx.GraphModule, inputs: tuple[Any, ...], path: Path
                ) -> tuple[dict[str, Any], Any]:
    try:
        program = torch.export.export(route, inputs)
        torch.export.save(program, str(path))
    except Exception as e:  # recorded in the manifest, not hidden
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}, None
    return {"status": "saved", "path": path.name, "sha256": _sha256(path)}, program


def _export_onnx(program: Any, route: fx.GraphModule, inputs: tuple[Any, ...],
                 want: list[torch.Tensor], path: Path, tol: float) -> dict[str, Any]:
    try:
        torch.onnx.export(program if program is not None else route, inputs, str(path),
                          dynamo=True, verbose=False)
    except Exception as e:  # recorded in the manifest, not hidden
        return {"status": "failed", "error": f"ONNX export: {type(e).__name__}: {e}"[:2000]}
    entry: dict[str, Any] = {"path": path.name, "sha256": _sha256(path), "tolerance": tol}
    try:
        onnx_route = OnnxRoute(path, pytree.tree_flatten(want)[1])
        got = onnx_route.session.run(None, {
            i.name: x.detach().cpu().numpy()
            for i, x in zip(onnx_route.session.get_inputs(),
                            [x for x in inputs if isinstance(x, torch.Tensor)])
        })
        err = _max_rel([torch.from_numpy(np.asarray(g)) for g in got], want)
    except Exception as e:  # recorded in the manifest, not hidden
        entry.update(status="failed", error=f"onnxruntime: {type(e).__name__}: {e}"[:2000])
        return entry
    entry["relative_error"] = err
    if err <= tol:
        entry["status"] = "verified"
    else:
        entry.update(status="mismatch",
                     error=f"onnxruntime output differs from the route by {err:.3g} (relative), "
                           f"above the tolerance {tol:g}")
    return entry


def _source(surgeon: Surgeon | None, source: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"spec": source}
    if surgeon is not None:
        cls = type(surgeon.model)
        out["model_class"] = f"{cls.__module__}.{cls.__qualname__}"
        out["trace_path"] = surgeon.trace_path
        out["tasks"] = list(surgeon.tasks)
    return out


def save_routes(
    routes: Mapping[str, nn.Module] | fx.GraphModule,
    directory: str | Path,
    surgeon: Surgeon | None = None,
    source: str | None = None,
    formats: Sequence[str] = FORMATS,
    overwrite: bool = False,
    onnx_tol: float = 1e-4,
) -> dict[str, Path]:
    """Save routes from ``Surgeon.export_routes`` (a dict, or one union route).

    Args:
        routes: ``{name: route}`` or one route (saved under its task names joined by ``+``).
        directory: parent directory; each route goes to ``directory/<name>/``.
        surgeon: the surgeon the routes came from (adds the model class and full-model costs).
        source: how to rebuild the source model (e.g. a ``build_model`` spec), recorded as is.
        formats: any of ``"pt"``, ``"pt2"``, ``"onnx"`` (``"onnx"`` needs ``"pt2"`` first or
            exports the GraphModule directly).
        overwrite: replace existing saved routes; otherwise an existing file is an error.
        onnx_tol: relative tolerance for onnxruntime against the route.

    Returns ``{name: manifest path}``.
    """
    if isinstance(routes, fx.GraphModule):
        routes = {"+".join(_info("route", routes).tasks): routes}
    unknown = set(formats) - set(FORMATS)
    if unknown or "pt" not in formats:
        raise InputError(f"formats must include 'pt' and be among {FORMATS}, got {list(formats)}")
    infos = {name: _info(name, r) for name, r in routes.items()}
    root = Path(directory)
    dirs = {name: root / _dirname(name) for name in routes}
    if len(set(dirs.values())) != len(dirs):
        raise InputError(f"route names {list(routes)} map to the same directory name")
    if not overwrite:
        existing = [str(d / f) for d in dirs.values()
                    for f in [*_FILES.values(), _CHECK, _MANIFEST] if (d / f).exists()]
        if existing:
            raise FileExistsError(f"refusing to overwrite saved routes {existing[:3]}"
                                  f"{' ...' if len(existing) > 3 else ''}; pass overwrite=True "
                                  f"or choose another directory")
    full = _full_costs(surgeon, infos)
    written: dict[str, Path] = {}
    for name, route in routes.items():
        written[name] = _save_one(name, route, infos[name], dirs[name], surgeon, source,
                                  formats, onnx_tol, full)
    return written


def _full_costs(surgeon: Surgeon | None, infos: Mapping[str, RouteInfo]) -> dict[str, int]:
    if surgeon is None:
        return {}
    inputs = next(iter(infos.values())).example_inputs if infos else ()
    gm = surgeon.traced.eval_graph
    return {"params": count_params(surgeon.model), "flops": count_flops(gm, list(inputs))}


def _save_one(name: str, route: nn.Module, info: RouteInfo, d: Path, surgeon: Surgeon | None,
              source: str | None, formats: Sequence[str], onnx_tol: float,
              full: Mapping[str, int]) -> Path:
    assert isinstance(route, fx.GraphModule)
    d.mkdir(parents=True, exist_ok=True)
    for f in [*_FILES.values(), _CHECK, _MANIFEST]:  # overwrite=True: no stale files remain
        p = d / f
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    route.eval()
    inputs = tuple(info.example_inputs)
    with torch.no_grad():
        out = route(*inputs)
    leaves, spec = pytree.tree_flatten(out)
    torch.save({"inputs": list(inputs), "outputs": leaves}, d / _CHECK)
    torch.save(route, d / _FILES["pt"])
    files: dict[str, Any] = {"pt": {"status": "saved", "path": _FILES["pt"],
                                    "sha256": _sha256(d / _FILES["pt"])},
                             "check": {"status": "saved", "path": _CHECK,
                                       "sha256": _sha256(d / _CHECK)}}
    program = None
    if "pt2" in formats:
        files["pt2"], program = _export_pt2(route, inputs, d / _FILES["pt2"])
    if "onnx" in formats:
        files["onnx"] = _export_onnx(program, route, inputs, leaves, d / _FILES["onnx"],
                                     onnx_tol)
    mask = info.mask
    manifest = {
        "format": "routesurgeon-route",
        "format_version": FORMAT_VERSION,
        "name": name,
        "tasks": list(info.tasks),
        "union": mask.tasks is not None,
        "routesurgeon_version": __version__,
        "torch_version": torch.__version__,
        "source": _source(surgeon, source),
        "selection": {"keep": info.keep, "threshold": info.threshold, "scores": info.scores},
        "verification": {"reference": "masked full model", "tolerance": info.tol,
                         "relative_error": info.error},
        "params": count_params(route),
        "flops": count_flops(route, list(inputs)),
        "full_model": dict(full),
        "inputs": [{"shape": list(x.shape), "dtype": str(x.dtype)} if isinstance(x, torch.Tensor)
                   else {"value": repr(x)} for x in inputs],
        "output_spec": pytree.treespec_dumps(spec),
        "layers": {layer: {"channels": int(mask.channels[layer]),
                           "kept": [int(i) for i in kept]}
                   for layer, kept in mask.kept.items()},
        "files": files,
    }
    path = d / _MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(directory: str | Path, name: str | None = None) -> dict[str, Any]:
    """The manifest of a saved route (``directory`` is the route's own directory if no name)."""
    d = Path(directory) if name is None else Path(directory) / _dirname(name)
    path = d / _MANIFEST
    if not path.is_file():
        raise TaskError(f"no saved route at {d} (missing {_MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != "routesurgeon-route":
        raise CheckpointError(f"{path} is not a routesurgeon route manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('format_version')}; "
                              f"this routesurgeon reads version {FORMAT_VERSION}")
    return manifest


def _checked_file(d: Path, manifest: Mapping[str, Any], key: str) -> Path:
    entry = manifest["files"].get(key)
    if entry is None:
        raise CheckpointError(f"the route in {d} was saved without format {key!r}")
    if "sha256" not in entry or entry.get("status") == "failed":
        raise CheckpointError(f"format {key!r} of the route in {d} was not saved: "
                              f"{entry.get('error', 'no file recorded')}")
    path = d / entry["path"]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if _sha256(path) != entry["sha256"]:
        raise CheckpointError(f"{path} does not match the SHA-256 in its manifest: the file was "
                              f"changed or replaced after saving")
    return path


def load_route(directory: str | Path, name: str | None = None, format: str = "pt",
               verify: bool = True, device: str | torch.device | None = None) -> Any:
    """Load a saved route in ``format`` (``pt``: GraphModule, ``pt2``: ``ExportedProgram``'s
    module, ``onnx``: ``OnnxRoute``), after checking its manifest and file hashes.

    ``device``: where the route's weights (and the check inputs) go, e.g. ``"cpu"`` for a route
    saved from a GPU on a machine without one; default: where they were saved. ONNX routes run
    on onnxruntime's CPU provider.

    With ``verify`` the loaded route must reproduce the saved outputs on the saved inputs within
    the manifest's tolerance (``CheckpointError`` otherwise).
    """
    if format not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {format!r}")
    d = Path(directory) if name is None else Path(directory) / _dirname(name)
    manifest = read_manifest(d)
    path = _checked_file(d, manifest, format)
    if format == "pt":
        route: Any = torch.load(path, weights_only=False, map_location=device)
        route.eval()
    elif format == "pt2":
        program = torch.export.load(str(path))
        if device is not None:
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        route = program.module()
    else:
        if manifest["files"]["onnx"].get("status") != "verified":
            raise CheckpointError(f"{path} was saved but not verified by onnxruntime: "
                                  f"{manifest['files']['onnx'].get('error')}")
        route = OnnxRoute(path, pytree.treespec_loads(manifest["output_spec"]))
    if verify:
        where = "cpu" if format == "onnx" else device
        check = torch.load(_checked_file(d, manifest, "check"), weights_only=True,
                           map_location=where)
        with torch.no_grad():
            got = pytree.tree_leaves(route(*check["inputs"]))
        err = _max_rel(got, check["outputs"])
        tol = manifest["files"]["onnx"]["tolerance"] if format == "onnx" \
            else manifest["verification"]["tolerance"]
        if not err <= tol:
            raise CheckpointError(f"the {format} route in {d} differs from its saved outputs by "
                                  f"{err:.3g} (relative; tolerance {tol:g})")
    return route
