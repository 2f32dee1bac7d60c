"""Tables from a recipe's ``runs.jsonl`` (also of a run still in progress: complete seeds only).

    python recipes/tables.py multifashion runs/r1 [runs/r1-seed2 ...]
    python recipes/tables.py study runs/study/runs.jsonl [--png curves.png]   # recipes/study.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

# metric -> higher is better, and the delta_m metrics, per recipe (as their make_recipe defines)
METRICS: dict[str, tuple[dict[str, bool], tuple[str, ...] | None]] = {
    "multifashion": ({"left/acc": True, "right/acc": True}, None),
    "multiexit": ({"exit0/acc": True, "exit1/acc": True, "exit2/acc": True, "coarse/acc": True},
                  None),
    "onet": ({"box/mse": False, "landmarks/mse": False, "face/auc": True, "face/acc": True},
             ("face/auc", "face/acc")),
    "dense": ({"seg/mIoU": True, "seg/pix_acc": True, "depth/abs_err": False,
               "normals/angle_deg": False}, None),
}


def load(run_dirs: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records of every run directory (e.g. seeds run as separate processes); a later directory's
    record replaces an earlier one of the same method (or task) and seed."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    singles: dict[tuple[str, int], dict[str, Any]] = {}
    for run_dir in run_dirs:
        for line in (run_dir / "runs.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "single" in rec:
                singles[(rec["single"]["task"], rec["single"]["seed"])] = rec["single"]
            else:
                runs[(rec["method"], rec["seed"])] = rec
    return list(runs.values()), list(singles.values())


def complete_seeds(runs: list[dict[str, Any]], n_methods: int) -> list[int]:
    seeds: dict[int, int] = {}
    for r in runs:
        seeds[r["seed"]] = seeds.get(r["seed"], 0) + 1
    return sorted(s for s, n in seeds.items() if n >= n_methods)


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["study"]:  # the method study's records (95 % CIs, paired tests, curves)
        import study_tables

        return study_tables.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe", choices=sorted(METRICS))
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--methods", type=int, default=None, help="methods per complete seed")
    a = p.parse_args(argv)
    hib, dkeys = METRICS[a.recipe]
    runs, singles = load(a.run_dirs)
    seeds = complete_seeds(runs, a.methods or len(h.default_methods()))  # with tuned-equal
    runs = [r for r in runs if r["seed"] in seeds]
    singles = [s for s in singles if s["seed"] in seeds]
    text = h.markdown(h.summarise(hib, runs, singles, dkeys), f"{a.recipe}, seeds {seeds}")
    print(text)
    return text


if __name__ == "__main__":
    main()
