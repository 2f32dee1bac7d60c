"""Coverage over timm's whole registry (and smp architectures x encoders): trace and export.

Not a CI test: a slow, sharded, resumable benchmark. The population is every name in
``timm.list_models()`` that builds with ``pretrained=False`` and has at most ``--max-params``
parameters (counted on the meta device, at the model's default configuration), at its default
small input: ``--input`` pixels square (96; built with ``img_size=96`` where the model's
constructor takes one), or, when the model cannot be built or run at that size, its default
input size (``pretrained_cfg["input_size"]``). Each model is checked
in two multi-output forms: ``features_only`` (one task per feature stage) and a backbone with
three linear heads. ``--smp`` checks every smp architecture with a spread of encoders instead.

Per model:

1. build it (random weights) and run it eagerly in eval mode;
2. ``routesurgeon.instrument`` it: the traced graph must be ``torch.equal`` to eager (checked
   inside ``instrument``) and ``Surgeon(x)`` must equal ``model(x)``;
3. ``export_routes(keep=1.0)``: one route per task, nothing pruned that the task reaches, each
   verified against its masked reference, and each route's output compared with the eager
   model's output of its task (``exact`` when ``torch.equal``, else its relative error).

Results are appended, one JSON line per model, to ``--results`` as each model finishes, so a run
resumes where it stopped; ``--shard i/n`` takes every n-th model from the i-th. The report in
``docs/coverage.md`` is generated from the jsonl by ``benchmarks/coverage_report.py``.

Run: ``nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/coverage_timm.py --shard 0/2``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import re
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _common import Timeout, same, time_limit

import routesurgeon as rs
from routesurgeon.outputs import output_names

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "runs" / "coverage_timm.jsonl"

# smp: every architecture x a spread of encoders (resnet, efficientnet, mobilenet, mix
# transformer, and timm's universal encoders for a convnext, a regnet, a mobilevit and a ViT,
# the only kind DPT takes)
SMP_ENCODERS = ["resnet18", "efficientnet-b0", "mobilenet_v2", "mit_b0", "tu-convnext_atto",
                "tu-regnety_004", "tu-mobilevitv2_050", "tu-vit_tiny_patch16_224"]


def _short(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return (a64 - b64).abs().max().item() / max(b64.abs().max().item(), 1e-12)


# -- the population ------------------------------------------------------------------------------
def _load_population(cache: Path) -> dict[str, dict[str, Any]]:
    if not cache.exists():
        return {}
    return {r["name"]: r for r in map(json.loads, cache.read_text().splitlines())}


def population_entry(name: str, known: dict[str, dict[str, Any]], cache: Path
                     ) -> dict[str, Any]:
    """A registry name's parameter count (meta device), default input and build error, cached."""
    import timm

    if name in known:
        return known[name]
    row: dict[str, Any] = {"name": name}
    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
        row["params"] = sum(p.numel() for p in m.parameters())
        cfg = getattr(m, "pretrained_cfg", None) or {}
        row["input_size"] = list(cfg.get("input_size", (3, 224, 224)))
        row["img_size_kw"] = "img_size" in inspect.signature(type(m).__init__).parameters
        del m
    except Exception as e:
        row["error"] = _short(e)
    known[name] = row
    with cache.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _attempts(entry: dict[str, Any], small: int) -> list[tuple[Any, dict[str, Any]]]:
    """(input size, create_model kwargs) to try in order: the small size, then the default."""
    h, w = int(entry["input_size"][1]), int(entry["input_size"][2])
    first = (small, {"img_size": small} if entry.get("img_size_kw") else {})
    return [first] if (h, w) == (small, small) and not first[1] else [first, ((h, w), {})]


# -- one model -----------------------------------------------------------------------------------
def _build_and_run(spec: str, features_only: bool, attempts: list[tuple[Any, dict[str, Any]]],
                   aux_classes: int | None, row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Build and run the model eagerly at the first size that works; raise the last error."""
    errors = []
    for size, kwargs in attempts:
        torch.manual_seed(0)
        try:
            built = rs.build_model(spec, features_only=features_only, aux_classes=aux_classes,
                                   input_size=size, **kwargs)
            model, x = built.model.eval(), built.example_inputs
            with torch.no_grad():
                want = model(x)
        except Timeout:
            raise
        except Exception as e:
            errors.append(f"at {size} {kwargs}: {_short(e, 300)}")
            continue
        row.update(input_size=size, kwargs=kwargs,
                   params=sum(p.numel() for p in model.parameters()))
        if errors:
            row["small_input_error"] = errors[0]
        return built, model, want
    raise RuntimeError("; ".join(errors))


def run_case(spec: str, features_only: bool, attempts: list[tuple[Any, dict[str, Any]]],
             seconds: int, aux_classes: int | None = None) -> dict[str, Any]:
    form = "features_only" if features_only else ("+aux" if aux_classes else "+3 heads")
    row: dict[str, Any] = {"key": f"{spec} {form}", "spec": spec, "form": form}
    t0 = time.perf_counter()
    stage = "build"
    try:
        with time_limit(seconds):
            built, model, want = _build_and_run(spec, features_only, attempts, aux_classes, row)
            x = built.example_inputs
            stage = "instrument"
            t1 = time.perf_counter()
            s = rs.instrument(model, x, tasks=built.tasks)
            row.update(path=s.trace_path, tasks=len(s.tasks),
                       layers=len(s.topology.layers()), shared=len(s.topology.shared_layers()),
                       instrument_s=round(time.perf_counter() - t1, 3))
            s.eval()
            with torch.no_grad():
                if not same(s(x), want):
                    raise AssertionError("Surgeon(x) is not torch.equal to model(x)")
            stage = "export"
            t1 = time.perf_counter()
            routes = s.export_routes(keep=1.0)
            eager = dict(output_names(want))
            exact, worst = True, 0.0
            with torch.no_grad():
                for task, route in routes.items():
                    got = route(*s.example_inputs())
                    ref = eager[s.outputs.task_outputs[s.outputs.tasks.index(task)]]
                    if got.shape != ref.shape:
                        raise AssertionError(f"route {task!r} returns {tuple(got.shape)}, "
                                             f"eager {tuple(ref.shape)}")
                    if not torch.equal(got, ref):
                        exact = False
                        worst = max(worst, _rel(got, ref))
            if worst > 1e-5:
                raise AssertionError(f"a keep=1.0 route differs from eager by {worst:.3g}")
            row.update(export_s=round(time.perf_counter() - t1, 3), routes=len(routes),
                       route_exact=exact, route_err=worst)
            row["status"] = "ok"
    except Exception as e:
        row.update(status=f"{stage}-error", error=_short(e), error_type=type(e).__name__)
        if not isinstance(e, (rs.RouteSurgeonError, Timeout, AssertionError)):
            row["where"] = traceback.format_exc(limit=-3).strip().splitlines()[-3:]
    row["time"] = round(time.perf_counter() - t0, 3)
    return row


# -- driver --------------------------------------------------------------------------------------
Case = tuple[str, bool, list[tuple[Any, dict[str, Any]]], "int | None"]


def smp_cases() -> list[Case]:
    out: list[Case] = []
    for arch in _smp_archs():
        for enc in SMP_ENCODERS:
            size = 224 if arch == "DPT" else 128
            kw = {"dynamic_img_size": True} if arch == "DPT" else {}
            out.append((f"smp:{arch}:{enc}", False, [(size, kw)], 4))
    return out


def timm_cases(args: argparse.Namespace, names: list[str], shard: tuple[int, int]
               ) -> Iterator[Case | dict[str, Any]]:
    """Each name's cases (or its population row when it is outside the bound / does not build)."""
    known = _load_population(args.population)
    forms = {"features": [True], "heads": [False], "both": [True, False]}[args.forms]
    entries = [population_entry(name, known, args.population) for name in names]
    # the smallest models first: a run stopped early covers every model up to some size
    entries.sort(key=lambda e: (e.get("params", float("inf")), e["name"]))
    entries = entries[shard[0]::shard[1]]
    for fo in forms:  # every model's features_only form first (the headline population)
        for e in entries:
            name = e["name"]
            if "error" in e or e["params"] > args.max_params:
                if fo == forms[0]:
                    yield e
                continue
            yield (f"timm:{name}", fo, _attempts(e, args.input), None)


def _smp_archs() -> list[str]:
    import segmentation_models_pytorch as smp

    return sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shard", default="0/1", help="i/n: every n-th model starting at the i-th")
    p.add_argument("--max-params", type=float, default=20e6)
    p.add_argument("--input", type=int, default=96, help="the small input size tried first")
    p.add_argument("--forms", choices=["features", "heads", "both"], default="both")
    p.add_argument("--smp", action="store_true", help="smp architectures x encoders instead")
    p.add_argument("--only", default=None, help="regex on the model key")
    p.add_argument("--rerun", default=None,
                   help="regex on the status of recorded rows to run again (e.g. 'error')")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--population", type=Path, default=ROOT / "runs" / "timm_population.jsonl")
    p.add_argument("--limit", type=int, default=0, help="stop after this many models (timing)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    i, n = (int(v) for v in args.shard.split("/"))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    if args.smp:
        todo: Iterator[Case | dict[str, Any]] = iter(smp_cases()[i::n])
    else:
        import timm

        todo = timm_cases(args, timm.list_models(), (i, n))
    ran = 0
    with args.results.open("a") as f:
        for item in todo:
            if isinstance(item, dict):  # outside the population: recorded once, not run
                continue
            spec, fo, attempts, aux = item
            form = "features_only" if fo else ("+aux" if aux else "+3 heads")
            key = f"{spec} {form}"
            if args.only and not re.search(args.only, key):
                continue
            old = done.get(key)
            if old is not None and not (args.rerun and re.search(args.rerun, old["status"])):
                continue
            r = run_case(spec, fo, attempts, args.timeout, aux)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"{r['status']:16} {r.get('path', '-'):18} {r['time']:7.2f}s {key} "
                  f"{r.get('error', '')[:200]}", flush=True)
            gc.collect()
            ran += 1
            if args.limit and ran >= args.limit:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
