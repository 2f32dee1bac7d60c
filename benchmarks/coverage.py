"""Tracing coverage over real timm and smp models; writes ``docs/coverage.md``.

For every model (timm architectures both as ``features_only`` feature pyramids and as a backbone
with three linear heads; smp architecture/encoder pairs with an auxiliary classification head):

- ``routesurgeon.instrument`` it; the Surgeon's eval-mode outputs must be ``torch.equal`` to the
  model's, the model must still compute the same after instrumenting, and the topology must find a
  shared trunk (``shared_layers()`` non-empty);
- record the trace path, layers, shared layers, the shared filter fraction and the time;
- on a copy, check whether plain ``torch.fx.symbolic_trace`` and
  ``torch.export.export(strict=False)`` trace it and reproduce its outputs.

Besides the named list, ``--random N`` draws N more timm models from ``timm.list_models()`` with a
seed (models above ``--max-params`` are skipped, counted on the meta device), to check that the
front-end works for families and not for a list.

Run: ``python benchmarks/coverage.py [--random 12] [--seed 0] [--only REGEX] [--no-baselines]``.
Results are appended to ``--results`` (JSON lines, one per model, so a run can resume) and the
markdown report is regenerated from all of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import same, time_limit
from torch import nn
from torch.utils import _pytree as pytree

import routesurgeon as rs

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One model to instrument: a ``build_model`` spec and its keyword arguments."""

    spec: str
    features_only: bool = False
    input_size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = ""

    @property
    def key(self) -> str:
        return f"{self.spec}{' features_only' if self.features_only else ' +3 heads'}" if (
            self.spec.startswith("timm:")) else f"{self.spec} +aux"


# (timm name, family, input size, extra create_model kwargs)
TIMM: list[tuple[str, str, int, dict[str, Any]]] = [
    ("resnet18", "resnet", 64, {}),
    ("resnet50d", "resnet", 64, {}),
    ("resnext26ts", "resnext", 64, {}),
    ("regnetx_002", "regnet", 64, {}),
    ("regnety_004", "regnet (SE)", 64, {}),
    ("res2net50_26w_4s", "res2net (split/concat)", 64, {}),
    ("resnest14d", "resnest (split attention)", 64, {}),
    ("skresnet18", "sknet (selective kernel)", 64, {}),
    ("nf_resnet26", "normalizer-free", 64, {}),
    ("repvgg_a0", "repvgg", 64, {}),
    ("convnext_atto", "convnext", 64, {}),
    ("convnextv2_atto", "convnext v2 (GRN)", 64, {}),
    ("efficientnet_b0", "efficientnet", 64, {}),
    ("tf_efficientnet_b0", "efficientnet (TF same padding)", 64, {}),
    ("efficientnetv2_rw_t", "efficientnet v2", 64, {}),
    ("mixnet_s", "mixnet (mixed kernels)", 64, {}),
    ("tf_mixnet_s", "mixnet (TF same padding)", 64, {}),
    ("mnasnet_small", "mnasnet", 64, {}),
    ("mobilenetv2_050", "mobilenet v2", 64, {}),
    ("mobilenetv3_small_050", "mobilenet v3", 64, {}),
    ("mobilenetv4_conv_small", "mobilenet v4", 64, {}),
    ("ghostnet_050", "ghostnet", 64, {}),
    ("fbnetc_100", "fbnet (NAS)", 64, {}),
    ("hardcorenas_a", "hardcorenas (NAS)", 64, {}),
    ("tinynet_e", "tinynet (NAS)", 64, {}),
    ("lcnet_050", "lcnet", 64, {}),
    ("rexnet_100", "rexnet", 64, {}),
    ("densenet121", "densenet (dense concat)", 64, {}),
    ("dla34", "dla (aggregation tree)", 64, {}),
    ("hrnet_w18_small", "hrnet (multi-resolution)", 64, {}),
    ("cspresnet50", "cspnet", 64, {}),
    ("dpn48b", "dpn (dual path)", 64, {}),
    ("ese_vovnet19b_dw", "vovnet", 64, {}),
    ("selecsls42b", "selecsls", 64, {}),
    ("vit_tiny_patch16_224", "vit", 64, {"img_size": 64}),
    ("deit_tiny_distilled_patch16_224", "deit (distilled, 2 tokens)", 64, {"img_size": 64}),
    ("beitv2_base_patch16_224", "beit (rel. pos. bias)", 64, {"img_size": 64, "depth": 4}),
    ("swin_tiny_patch4_window7_224", "swin", 128, {"img_size": 128, "window_size": 4}),
    ("pit_ti_224", "pit (pooling vit)", 224, {}),
    ("cait_xxs24_224", "cait (class attention)", 64, {"img_size": 64}),
    ("xcit_nano_12_p16_224", "xcit", 64, {"img_size": 64}),
    ("levit_128s", "levit (hybrid)", 224, {}),
    ("efficientformer_l1", "efficientformer (hybrid)", 224, {}),
    ("efficientformerv2_s0", "efficientformer v2 (hybrid)", 224, {}),
    ("mobilevit_xxs", "mobilevit (hybrid)", 64, {}),
    ("mobilevitv2_050", "mobilevit v2 (hybrid)", 64, {}),
    ("efficientvit_b0", "efficientvit (MIT)", 64, {}),
    ("efficientvit_m0", "efficientvit (MSRA)", 224, {}),
    ("coatnet_nano_rw_224", "coatnet (hybrid)", 224, {}),
    ("maxvit_nano_rw_256", "maxvit (hybrid)", 128, {"img_size": 128}),
    ("convit_tiny", "convit (hybrid)", 64, {"img_size": 64}),
    ("poolformer_s12", "poolformer (metaformer)", 64, {}),
    ("edgenext_xx_small", "edgenext (hybrid)", 64, {}),
    ("fastvit_t8", "fastvit (reparam hybrid)", 64, {}),
    ("repvit_m1", "repvit", 64, {}),
    ("tiny_vit_5m_224", "tiny-vit (hybrid)", 224, {}),
    ("twins_svt_small", "twins", 64, {}),
    ("mixer_s16_224", "mlp-mixer", 64, {"img_size": 64}),
]

# (arch, encoder)
SMP: list[tuple[str, str]] = [
    ("Unet", "resnet18"),
    ("UnetPlusPlus", "resnet18"),
    ("FPN", "efficientnet-b0"),
    ("PSPNet", "mobilenet_v2"),
    ("DeepLabV3", "resnet18"),
    ("DeepLabV3Plus", "efficientnet-b0"),
    ("Linknet", "resnet18"),
    ("MAnet", "mobilenet_v2"),
    ("PAN", "resnet18"),
    ("UPerNet", "resnet18"),
    ("Segformer", "mit_b0"),
    ("Unet", "mit_b0"),
    ("FPN", "tu-convnext_atto"),
    ("Unet", "tu-mobilevitv2_050"),
    ("DeepLabV3Plus", "tu-regnety_004"),
    ("Linknet", "tu-efficientnet_b0"),
    ("DPT", "tu-vit_tiny_patch16_224"),
]


def named_cases() -> list[Case]:
    cases: list[Case] = []
    for name, family, size, kw in TIMM:
        for fo in (True, False):
            cases.append(Case(f"timm:{name}", fo, size, kw, family))
    for arch, enc in SMP:
        size = 224 if arch == "DPT" else 128
        kw: dict[str, Any] = {"dynamic_img_size": True} if arch == "DPT" else {}
        cases.append(Case(f"smp:{arch}:{enc}", False, size, kw, f"smp {arch}"))
    return cases


def random_cases(n: int, seed: int, max_params: float, exclude: set[str]) -> list[Case]:
    """``n`` random timm models under ``max_params`` parameters (counted on the meta device)."""
    import timm

    names = sorted(set(timm.list_models()) - exclude)
    rng = random.Random(seed)
    rng.shuffle(names)
    cases: list[Case] = []
    for name in names:
        if len(cases) >= 2 * n:
            break
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
        except Exception:  # not buildable without extra arguments: skip, as a user would
            continue
        if sum(p.numel() for p in m.parameters()) > max_params:
            continue
        cfg = getattr(m, "pretrained_cfg", {}) or {}
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        fo = len(cases) % 2 == 0  # alternate the two multi-output forms
        cases.append(Case(f"timm:{name}", fo, size, {}, "random"))
    return cases[:n]


# --------------------------------------------------------------------------------------------
def close(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_flatten(a)[0], pytree.tree_flatten(b)[0]
    return len(la) == len(lb) and all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-5) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(la, lb)
    )


def _short(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _baseline(fn: Any, model: nn.Module, x: torch.Tensor, want: Any, seconds: int) -> str:
    """'equal', 'close', 'wrong' or 'fail: error' for a third-party tracer on a copy."""
    try:
        with time_limit(seconds), torch.no_grad():
            got = fn(copy.deepcopy(model), x)
    except Exception as e:
        return "fail: " + _short(e, 200)
    if same(got, want):
        return "equal"
    return "close" if close(got, want) else "wrong"


def _fx_plain(model: nn.Module, x: torch.Tensor) -> Any:
    return torch.fx.symbolic_trace(model)(x)


def _export(model: nn.Module, x: torch.Tensor) -> Any:
    return torch.export.export(model, (x,), strict=False).module()(x)


def run_case(case: Case, baselines: bool, seconds: int) -> dict[str, Any]:
    row: dict[str, Any] = {"key": case.key, **asdict(case)}
    torch.manual_seed(0)
    try:
        with time_limit(seconds):
            built = rs.build_model(case.spec, features_only=case.features_only,
                                   aux_classes=4 if case.spec.startswith("smp:") else None,
                                   input_size=case.input_size, **case.kwargs)
    except Exception as e:
        row.update(status="build-error", error=_short(e))
        return row
    model, x = built.model.eval(), built.example_inputs
    row["params"] = sum(p.numel() for p in model.parameters())
    try:
        with torch.no_grad(), time_limit(seconds):
            want = model(x)
    except Exception as e:
        row.update(status="build-error", error="the model itself fails: " + _short(e))
        return row
    t0 = time.perf_counter()
    try:
        with time_limit(seconds):
            s = rs.instrument(model, x, tasks=built.tasks)
    except Exception as e:
        row.update(status="error", error=_short(e, 1200),
                   error_type=type(e).__name__, time=time.perf_counter() - t0)
        if not isinstance(e, rs.RouteSurgeonError):
            row["traceback"] = traceback.format_exc(limit=-4)
    else:
        row["time"] = time.perf_counter() - t0
        s.eval()
        with torch.no_grad():
            got = s(x)
            after = model(x)
        topo = s.topology
        layers = topo.layers()
        shared = [la for la in layers if la.shared]
        filt = [la for la in layers if la.shared_filters is not None and la.out_channels]
        n_filters = sum(la.out_channels or 0 for la in filt)
        row.update(
            path=s.trace_path,
            leaves=s.traced.leaves,
            tasks=len(s.tasks),
            layers=len(layers),
            shared=len(shared),
            shared_filter_fraction=(
                sum(la.shared_filters or 0 for la in filt) / n_filters if n_filters else 0.0
            ),
            equal=same(got, want),
            model_unchanged=same(after, want),
        )
        ok = row["equal"] and row["model_unchanged"] and row["shared"] > 0
        row["status"] = "ok" if ok else "wrong"
        if not ok:
            row["error"] = ", ".join(
                what for what, bad in [("Surgeon(x) != model(x)", not row["equal"]),
                                       ("model changed by instrument", not row["model_unchanged"]),
                                       ("no shared layers", row["shared"] == 0)] if bad
            )
        del s
    if baselines:
        row["fx"] = _baseline(_fx_plain, model, x, want, seconds)
        # torch.export takes seconds per model: run it once per architecture (the feature
        # pyramid form; the heads form adds three linear layers) and on every smp/random model
        if case.features_only or not case.spec.startswith("timm:") or case.family == "random":
            row["export"] = _baseline(_export, model, x, want, seconds)
    return row


# --------------------------------------------------------------------------------------------
def _cell(v: str | None) -> str:
    if v is None:
        return "-"
    return "fail" if v.startswith("fail") else v


def write_report(rows: list[dict[str, Any]], path: Path, command: str) -> None:
    named = [r for r in rows if r.get("family") != "random"]
    rand = [r for r in rows if r.get("family") == "random"]
    lines = [
        "# Tracing coverage",
        "",
        "Generated by `benchmarks/coverage.py` (do not edit by hand): every model is built with",
        "random weights, instrumented on CPU in eval mode, and checked: `Surgeon(x)` is",
        "`torch.equal` to `model(x)`, the model computes the same after instrumenting, and the",
        "topology finds a shared trunk. `fx` and `export` say whether plain",
        "`torch.fx.symbolic_trace` and `torch.export.export(strict=False)` trace the same model",
        "(on a copy) and reproduce its outputs (`equal`, `close` within 1e-4, `wrong`, `fail`);",
        "`torch.export` is run once per timm architecture (on its `features_only` form, `-` on",
        "the heads form) and on every smp and random model.",
        "",
        f"Command: `{command}`",
        "",
        f"torch {torch.__version__}, timm {_version('timm')}, "
        f"segmentation-models-pytorch {_version('segmentation_models_pytorch')}.",
        "",
    ]
    for title, group in [("Named models", named), ("Random timm models", rand)]:
        if not group:
            continue
        lines += [f"## {title}", "", _totals(group), "",
                  "| model | family | input | trace path | layers | shared | shared filters "
                  "| time (s) | status | plain fx | torch.export |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
        for r in group:
            sff = r.get("shared_filter_fraction")
            lines.append(
                f"| `{r['key']}` | {r.get('family', '')} | {r.get('input_size')} "
                f"| {r.get('path', '-')} | {r.get('layers', '-')} | {r.get('shared', '-')} "
                f"| {'-' if sff is None else format(sff, '.1%')} "
                f"| {'-' if r.get('time') is None else format(r['time'], '.2f')} | {r['status']} "
                f"| {_cell(r.get('fx'))} | {_cell(r.get('export'))} |"
            )
        lines.append("")
    lines += ["## Totals over all models", "", _totals(rows), ""]
    paths: dict[str, int] = {}
    for r in rows:
        if r["status"] == "ok":
            paths[r["path"]] = paths.get(r["path"], 0) + 1
    lines += ["Trace paths taken: " + ", ".join(f"`{p}` {n}" for p, n in sorted(paths.items())),
              ""]
    bad = [r for r in rows if r["status"] != "ok"]
    lines += ["## Failures", ""]
    if not bad:
        lines.append("None.")
    for r in bad:
        lines.append(f"- `{r['key']}` ({r['status']}): {r.get('error', '')}")
    lines.append("")
    base = [r for r in rows if "fx" in r]
    if base:
        lines += ["## Third-party tracers that failed", ""]
        for r in base:
            for name in ("fx", "export"):
                v = r.get(name, "")
                if v.startswith("fail") or v == "wrong":
                    lines.append(f"- `{r['key']}` {name}: {v}")
        lines.append("")
    # keep the sections other scripts write between <!-- NAME:begin ... --> and <!-- NAME:end -->
    # (benchmarks/coverage_report.py, benchmarks/coverage_tv.py)
    old = path.read_text() if path.exists() else ""
    for block in re.finditer(r"<!-- (\w+):begin.*?<!-- \1:end -->", old, flags=re.S):
        lines.append(block.group(0) + "\n")
    path.write_text("\n".join(lines))


def _totals(rows: list[dict[str, Any]]) -> str:
    n = len(rows)
    ok = sum(r["status"] == "ok" for r in rows)
    base = [r for r in rows if "fx" in r]

    def count(name: str) -> str:
        tried = [r for r in base if name in r]
        good = sum(r[name] in ("equal", "close") for r in tried)
        return f"{good}/{len(tried)}"

    text = f"routesurgeon handled **{ok}/{n}** ({ok / max(1, n):.0%})"
    if base:
        text += (f"; plain `torch.fx.symbolic_trace` {count('fx')}, "
                 f"`torch.export` {count('export')} (outputs equal or close)")
    times = sorted(r["time"] for r in rows if r["status"] == "ok")
    if times:
        text += f"; instrument time median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s"
    return text + "."


def _version(mod: str) -> str:
    try:
        return str(__import__(mod).__version__)
    except Exception:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random", type=int, default=12, help="random timm models to add")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-params", type=float, default=30e6)
    p.add_argument("--only", default=None, help="regex on the case key")
    p.add_argument("--no-baselines", action="store_true", help="skip plain fx / torch.export")
    p.add_argument("--timeout", type=int, default=240, help="seconds per model and stage")
    p.add_argument("--results", type=Path, default=Path("/tmp/routesurgeon_coverage.jsonl"))
    p.add_argument("--fresh", action="store_true", help="ignore earlier results")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "coverage.md")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--rerun", action="store_true",
                   help="instrument every selected model again, keeping the plain fx / "
                        "torch.export results already recorded (they do not depend on us)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    cases = named_cases()
    if args.random:
        exclude = {c.spec.split(":", 1)[1] for c in cases if c.spec.startswith("timm:")}
        cases += random_cases(args.random, args.seed, args.max_params, exclude)
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.key)]
    done: dict[str, dict[str, Any]] = {}
    if args.results.exists() and not args.fresh:
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    if not args.report_only:
        with args.results.open("a" if not args.fresh else "w") as f:
            for c in cases:
                if c.key in done and not (args.only or args.rerun):
                    continue
                old = done.get(c.key, {})
                keep = args.rerun and "fx" in old
                r = run_case(c, not (args.no_baselines or keep), args.timeout)
                if keep:
                    r.update({k: old[k] for k in ("fx", "export") if k in old})
                done[c.key] = r
                f.write(json.dumps(r) + "\n")
                f.flush()
                print(f"{r['status']:6} {r.get('path', '-'):18} {r.get('time', 0):6.2f}s "
                      f"fx={_cell(r.get('fx'))} export={_cell(r.get('export'))} {c.key} "
                      f"{r.get('error', '')[:300]}", flush=True)
    keys = [c.key for c in named_cases()]
    rows = [done[k] for k in keys if k in done]
    rows += [r for k, r in done.items() if k not in keys]
    shown = [f"--random {args.random}", f"--seed {args.seed}"]  # what selects the models
    cmd = "python benchmarks/coverage.py " + " ".join(shown)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_report(rows, args.report, cmd.strip())
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"handled {ok}/{len(rows)}; report written to {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
