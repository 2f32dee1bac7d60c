"""Coverage over torchvision's whole populations (a benchmark, not a CI test).

Every classification, segmentation and video model (``tv:NAME``; GoogLeNet/Inception v3 with their
training-only aux logits, DeepLabV3/FCN with ``aux_loss``) and every detector's backbone + FPN +
heads (``tv:NAME:heads``), and every classification model's four trunk stages as tasks
(``tv:NAME:features``, torchvision's ``create_feature_extractor``), random init: instrument
(which checks the traced graph equals eager, in both modes when they differ),
``export_routes(keep=1.0)`` (each route verified against its masked reference), and each route's
output compared with the eager model's on the example, with nothing pruned (every route keeps
each layer's full width). One JSON line per model, appended, so a run resumes where it stopped:

    nohup nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/coverage_tv.py \\
        --out docs/coverage_data/tv.jsonl > runs/coverage_tv.log 2>&1 &
    python benchmarks/coverage_tv.py --out docs/coverage_data/tv.jsonl --report
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import routesurgeon as rs
from routesurgeon.outputs import output_names
from routesurgeon.zoo_tv import AUX_MODELS, tv_population

# Hugging Face classes built by hf:CLASS (small configs): pre-training heads, or base models
# with two heads on the pooled output
HF_CLASSES = ("BertForPreTraining", "BertModel", "RobertaModel", "ViTModel", "DeiTModel",
              "BeitModel", "ConvNextModel", "ConvNextV2Model", "SwinModel", "ResNetModel")


def specs() -> list[tuple[str, str, dict[str, Any]]]:
    out: list[tuple[str, str, dict[str, Any]]] = [
        ("huggingface", f"hf:{c}", {}) for c in HF_CLASSES]
    for pop, names in tv_population().items():
        for name in names:
            if pop == "detection":
                out.append((pop, f"tv:{name}:heads", {}))
            else:
                aux = name in AUX_MODELS or name.startswith(("deeplabv3_", "fcn_"))
                out.append((pop, f"tv:{name}", {"aux": aux}))
                if pop == "classification":  # its four trunk stages as tasks
                    out.append(("classification-features", f"tv:{name}:features", {}))
    return out


def check(spec: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    built = rs.build_model(spec, **kwargs)
    s = rs.instrument(built.model, built.example_inputs)
    row: dict[str, Any] = {"tasks": s.tasks, "path": s.trace_path,
                           "shared": len(s.shared_parameters())}
    routes = s.export_routes(keep=1.0)
    model = built.model.eval()
    with torch.no_grad():
        eager = dict(output_names(model(built.example_inputs)))
        worst = 0.0
        for task, route in routes.items():
            got = route(*s.example_inputs())
            leaf = s.outputs.task_outputs[s.tasks.index(task)]
            want = eager.get(leaf)
            if want is None:  # training-only outputs: the analysed graph (it contains eval's)
                want = dict(output_names(s.traced.eval_graph(*s.example_inputs())))[leaf]
            got_t = got if isinstance(got, torch.Tensor) else next(
                v for _, v in output_names(got) if isinstance(v, torch.Tensor))
            worst = max(worst, float((got_t - want).abs().max()))
            mask = route.meta["routesurgeon"].mask  # layers it does not reach keep 0
            if any(0 < len(k) < mask.channels[layer] for layer, k in mask.kept.items()):
                raise AssertionError(f"route {task} pruned channels at keep=1.0")
    row["max_abs_diff"] = worst
    row["exact"] = worst <= 1e-4
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/coverage_data/tv.jsonl")
    p.add_argument("--report", action="store_true", help="summarise the jsonl and exit")
    p.add_argument("--write", default=None, help="with --report: update this markdown file's "
                   "section (docs/coverage.md)")
    p.add_argument("--only", default=None, help="comma-separated specs to run")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the models whose last row failed (the new row wins)")
    p.add_argument("--reverse", action="store_true",
                   help="last model first (a second worker on the same jsonl)")
    a = p.parse_args()
    path = Path(a.out)
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[r["spec"]] = r
    if a.report:
        lines = report(done)
        if a.write:
            write_section(Path(a.write), lines)
        else:
            print("\n".join(lines))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(",")) if a.only else None
    todo = specs()[::-1] if a.reverse else specs()
    start = len(path.read_text().splitlines()) if path.exists() else 0
    for pop, spec, kwargs in todo:
        rows = path.read_text().splitlines() if path.exists() else []
        # rows written since this run started (by it or another worker) count as done
        retried = {json.loads(x)["spec"] for x in rows[start:]}
        done.update({r["spec"]: r for r in map(json.loads, rows)})
        again = a.retry_failed and spec not in retried
        if (spec in done and (done[spec]["ok"] or not again)) or (only and spec not in only):
            continue
        row: dict[str, Any] = {"population": pop, "spec": spec, **kwargs}
        try:
            row.update(check(spec, kwargs))
            row["ok"] = bool(row["exact"])
        except Exception as e:  # record every failure with its message
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000],
                       where=traceback.format_exc().splitlines()[-3][:300])
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(spec, row.get("ok"), row.get("seconds"), row.get("error", "")[:200], flush=True)


BEGIN = "<!-- coverage_tv:begin (generated by benchmarks/coverage_tv.py --report --write) -->"
END = "<!-- coverage_tv:end -->"
INTRO = """## torchvision and Hugging Face

Every torchvision classification, segmentation and video model (`torchvision.models.list_models`;
optical flow and quantized models excluded) built by `tv:NAME` with random weights (a backbone
with three linear heads; GoogLeNet and Inception v3 with their training-only aux logits,
DeepLabV3 and FCN with `aux_loss`), and every detector's backbone + FPN + heads
(`tv:NAME:heads`; the full detectors are refused with an error naming that part); and every
classification model's trunk as four stage outputs (`tv:NAME:features`: torchvision's own
`create_feature_extractor`, one task per stage). Each:
`instrument` (traced graph equal to eager, in both modes where they differ), then
`export_routes(keep=1.0)`: one route per task, each verified against its masked reference,
compared with the eager output of its task, and no layer it computes narrower than the model's.
Rows appended by `benchmarks/coverage_tv.py` (resumable, not a CI test; the test suite keeps a
sample in tests/test_torchvision.py, tests/test_detection.py and tests/test_hf.py).
Hugging Face classes are built by `hf:CLASS` from small configs (`*ForPreTraining` with its own
heads, base `*Model` classes with two heads on the pooled output) through `HFTasks`, a root with
explicit inputs: a transformers `forward` (`**kwargs` through decorators) cannot be the fx root,
and instrumenting one directly fails with an error that says to wrap it. BERT-family embeddings
become an opaque leaf (`fx-concrete+leaf`: their `token_type_ids` buffer expand does not trace),
so their embedding channels are never pruned.
"""


def report(done: dict[str, dict[str, Any]]) -> list[str]:
    """The markdown section of docs/coverage.md: X / N per population, each failure's message."""
    lines: list[str] = []
    out = lines.append
    pops: dict[str, list[dict[str, Any]]] = {}
    for r in done.values():
        pops.setdefault(r["population"], []).append(r)
    out("| population | traced = eager, exported exactly, nothing pruned | trace paths |")
    out("| --- | --- | --- |")
    for pop, rows in pops.items():
        ok = sum(bool(r["ok"]) for r in rows)
        paths: dict[str, int] = {}
        for r in rows:
            if r["ok"]:
                paths[r["path"]] = paths.get(r["path"], 0) + 1
        text = ", ".join(f"{k} {v}" for k, v in sorted(paths.items()))
        out(f"| {pop} | {ok} / {len(rows)} ({100 * ok / len(rows):.1f} %) | {text} |")
    both = pops.get("classification", []) + pops.get("segmentation", [])
    if both:
        ok = sum(bool(r["ok"]) for r in both)
        out(f"\nClassification + segmentation: **{ok} / {len(both)}** "
            f"({100 * ok / len(both):.1f} %).")
    missing = [spec for _, spec, _ in specs() if spec not in done]
    if missing:
        out(f"\nNot run yet (the sweep resumes with them): {', '.join(missing)}.")
    failed = [r for r in done.values() if not r["ok"]]
    out(f"\nFailures ({len(failed)}):\n")
    for r in failed:
        why = r.get("error") or f"route differs from eager by {r.get('max_abs_diff')}"
        out(f"- `{r['spec']}`: {why.splitlines()[0][:400]}")
    return lines


def write_section(path: Path, lines: list[str]) -> None:
    """Replace (or append) this script's section of ``path``, between its markers."""
    text = path.read_text()
    section = "\n".join([BEGIN, INTRO, *lines, "", END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
