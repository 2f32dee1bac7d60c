"""The method study: every method, several seeds, full-size data, results appended run by run.

One line per (study, method, seed) run goes to ``OUT/runs.jsonl`` (per-epoch validation metrics,
test metrics at the epoch and matched budgets' epochs, passes, CPU and wall seconds); a run
already there is skipped, so a stopped study resumes and a later session extends it (more seeds,
methods, or the pass-matched phase). Several worker processes may share one ``OUT``: each run is
claimed by a lock file first. ``recipes/tables.py study OUT/runs.jsonl`` builds the tables (95 %
CIs, paired tests, time-to-accuracy curves).

Budget: ``drmgf`` makes T + 1 passes over the data per epoch, so every other method is given
``(T + 1) * epochs`` epochs in the ``matched`` phase; the ``epoch`` phase runs ``epochs`` for all.
With a constant learning rate, the first ``epochs`` epochs of a matched run are the epoch-phase
run (the same batches in the same order): a matched run extends the epoch run from its checkpoint.

    python recipes/study.py --study r1-fashion-lenet --estimate     # time a few steps, extrapolate
    python recipes/study.py --study r1-fashion-lenet --out runs/study --seeds 0 1 2
    python recipes/study.py --study r1-fashion-lenet --phase matched --out runs/study
    python recipes/study.py --gpu-preset --out runs/gpu-study        # one GPU, under 8 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h
import study_data as sd
from study_records import append_record, claim, load_records

import routesurgeon as rs


@dataclass(frozen=True)
class Study:
    """One study: data, network and budget (the same for every method and seed)."""

    name: str
    data: str = "fashion"  # study_data.DATASETS
    model: str = "lenet"  # study_data.MODELS
    n_train: int = 60_000
    n_val: int = 10_000
    n_test: int = 10_000
    size: int = 28  # input side (LeNet: 28, the literature's resize of the 36 px canvas)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] | None = None  # None: single-task nets + rs.available_methods()
    device: str = "cpu"
    bf16: bool = False  # autocast to bfloat16 (on the device) where the method allows

    @property
    def tasks(self) -> tuple[str, ...]:
        return (("exit0", "exit1", "exit2", "coarse") if self.data == "fashion-mnist"
                else ("left", "right"))

    def fingerprint(self) -> dict[str, Any]:
        """What makes two runs comparable (seeds and methods excluded)."""
        d = asdict(self)
        for k in ("seeds", "methods", "name"):
            d.pop(k)
        return d


STUDIES = {s.name: s for s in [
    Study("r1-fashion-lenet"),
    Study("r1-fashionmnist-lenet", data="fashion+mnist"),
    Study("r2-fashion-lenet", data="fashion-mnist"),
    # a quick screen of drmgf-step's options (docs/results.md; the winners then run in the
    # full-size study)
    Study("dx-r1-fashion-lenet", n_train=12_000, n_val=5000, epochs=3, seeds=(0, 1, 2)),
    # the bigger backbones on a CPU-sized budget (subsets of the same splits)
    Study("r1-fashion-resnet18", model="resnet18", size=36, n_train=6000, n_val=2000,
          n_test=10_000, epochs=10, batch_size=64, seeds=(0, 1, 2)),
    Study("r1-fashion-mobilenetv2", model="mobilenetv2", size=64, n_train=6000, n_val=2000,
          n_test=10_000, epochs=5, batch_size=64, seeds=(0, 1, 2)),
    # one GPU: resnet18 on the full data, 30 epochs, bf16 (scripts/gpu_study.sh)
    Study("gpu-r1-fashion-resnet18", model="resnet18", size=36, epochs=30, batch_size=512,
          lr=2e-3, seeds=(0, 1, 2), device="cuda", bf16=True),
    # the CPU test of the GPU preset's code path (tests/test_study.py; see also --tiny)
    Study("tiny", n_train=96, n_val=32, n_test=64, epochs=2, batch_size=32, seeds=(0, 1),
          bf16=True, methods=("single:left", "single:right", "equal", "drmgf-step", "drmgf")),
]}


def tiny(study: Study) -> Study:
    """``study`` shrunk to seconds on a CPU (``--tiny``): the same code path, bf16 included."""
    return replace(study, name=f"{study.name}-tiny", n_train=64, n_val=32, n_test=32, epochs=1,
                   batch_size=32, seeds=(0,), device="cpu")


# -- methods ------------------------------------------------------------------------------------


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, options); values are read as JSON
    when they parse (numbers, true/false, null), else kept as strings. The option ``lr`` is the
    optimiser's learning rate, not the method's (``equal:lr=0.003``: the tuned-equal sweep)."""
    name, _, opts = spec.partition(":")
    config: dict[str, Any] = {}
    if name == "single":
        return spec, {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method spec {spec!r}: option {item!r} is not key=value")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return name, config


#: drmgf-step's fusion options the study runs beside its default (docs/results.md)
DRMGF_STEP_OPTIONS = ("drmgf-step:uniform_mix=0.5", "drmgf-step:warmup_steps=235",
                      "drmgf-step:ema=0.99", "drmgf-step:importance=gated")
#: the learning-rate factors of tuned equal weighting (chosen per seed on validation)
TUNED_LR_FACTORS = (0.3, 3.0)


def all_methods(study: Study) -> list[str]:
    """The study's runs per seed: single-task nets, every registered method, the tuned-equal
    learning-rate sweep (``equal:lr=X``) and drmgf-step's fusion options."""
    if study.methods is not None:
        return list(study.methods)
    sweep = [f"equal:lr={study.lr * f:g}" for f in TUNED_LR_FACTORS]
    return [*(f"single:{t}" for t in study.tasks), *rs.available_methods(), *sweep,
            *DRMGF_STEP_OPTIONS]


def passes_per_epoch(method: str, study: Study) -> int:
    return len(study.tasks) + 1 if parse_method(method)[0] == "drmgf" else 1


def target_epochs(method: str, study: Study, phase: str) -> int:
    """Epochs of ``method`` in ``phase``: ``epoch`` (every method ``study.epochs``) or
    ``matched`` (every method ``(T + 1) * study.epochs`` passes: drmgf's)."""
    if phase == "epoch" or parse_method(method)[0] == "drmgf":
        return study.epochs
    if phase != "matched":
        raise ValueError(f"phase must be 'epoch' or 'matched', got {phase!r}")
    return (len(study.tasks) + 1) * study.epochs


# -- records ------------------------------------------------------------------------------------


def pending(study: Study, records: dict[tuple[str, str, int], dict[str, Any]],
            methods: Sequence[str], seeds: Sequence[int], phase: str) -> list[tuple[int, str]]:
    """(seed, method) runs still to do, seed by seed (complete seeds accumulate first); refuses
    records of the same study name made with another configuration."""
    todo = []
    for seed in seeds:
        for m in methods:
            rec = records.get((study.name, m, seed))
            if rec is not None and rec["config"] != study.fingerprint():
                raise ValueError(
                    f"runs.jsonl holds {study.name!r} runs made with another configuration "
                    f"({rec['config']}); use another --out or another study name")
            if rec is None or len(rec["epochs"]) < target_epochs(m, study, phase):
                todo.append((seed, m))
    return todo


# -- one run ------------------------------------------------------------------------------------


def make_recipe(study: Study, splits: dict[str, Any]) -> h.Recipe:
    tasks = {t: h.TaskSpec(nn.functional.cross_entropy, (h.accuracy(),)) for t in study.tasks}
    return h.Recipe(study.name, lambda seed: sd.build_model(study.model, study.data, seed,
                                                            study.size)[:2],
                    tasks, splits["train"], splits["test"])


def load_splits(study: Study) -> dict[str, Any]:
    channels = 3 if study.model == "mobilenetv2" else 1
    resize = None if study.data == "fashion-mnist" and study.size == 28 else study.size
    splits = sd.make_splits(study.data, study.n_train, study.n_val, study.n_test, channels, resize)
    return {k: sd.on_device(v, study.device) for k, v in splits.items()}


def _autocast(study: Study, method: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for evaluation (training: the Trainer's ``precision="bf16"``)."""
    if not study.bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(study.device).type, dtype=torch.bfloat16)


def _trainer(surgeon: rs.Surgeon, optimizer: torch.optim.Optimizer, name: str,
             config: dict[str, Any], study: Study, progress: bool) -> tuple[rs.Trainer, str]:
    """The trainer of a run and its precision: bf16 where the method allows it (the Trainer's
    ``precision="bf16"``: autocast forwards, float32 parameters and backward), else float32."""
    if study.bf16:
        try:
            return rs.Trainer(surgeon, optimizer, method=name, config=config, progress=progress,
                              precision="bf16"), "bf16"
        except rs.RouteSurgeonError as e:  # the method refuses bf16: say so in the record
            return (rs.Trainer(surgeon, optimizer, method=name, config=config,
                               progress=progress), f"fp32 (bf16 refused: {e})")
    return rs.Trainer(surgeon, optimizer, method=name, config=config, progress=progress), "fp32"


def _sync(study: Study) -> None:
    if torch.device(study.device).type == "cuda":
        torch.cuda.synchronize()


def run_one(study: Study, method: str, seed: int, splits: dict[str, Any], out: Path,
            phase: str = "epoch", progress: bool = False) -> dict[str, Any]:
    """Train ``method`` on ``seed`` to its target epochs (continuing its checkpoint if any),
    evaluating validation and test after every epoch; returns the record (not yet written)."""
    recipe = make_recipe(study, splits)
    name, config = parse_method(method)
    lr = float(config.pop("lr", study.lr))
    h.seed_all(seed)
    model, example, _ = sd.build_model(study.model, study.data, seed, study.size)
    model.to(study.device)
    surgeon = rs.instrument(model, example.to(study.device), tasks=list(study.tasks))
    optimizer = torch.optim.Adam(surgeon.model_parameters(), lr=lr)
    ce = nn.functional.cross_entropy
    losses: dict[str, Any] = {t: ce for t in study.tasks}
    if name.startswith("single:"):  # the same net, only this task's loss
        task = name.split(":", 1)[1]
        losses = {t: ce if t == task else (lambda o, y: 0.0 * o.sum()) for t in study.tasks}
        name = "equal"
    if name == "drmgf":
        config = {"epochs": study.epochs, **config}
    trainer, precision = _trainer(surgeon, optimizer, name, config, study, progress)
    train = h.Batches(splits["train"], study.batch_size, True, seed)
    val = h.Batches(splits["val"], 1024, False)
    test = h.Batches(splits["test"], 1024, False)
    key = f"{study.name}/{method}/{seed}"
    ckpt = out / "checkpoints" / f"{key.replace(':', '_')}.pt"
    epochs: list[dict[str, Any]] = []
    cpu_s = wall_s = passes = 0.0
    if ckpt.exists():
        trainer.load_checkpoint(str(ckpt))
        extra = torch.load(str(ckpt) + ".study", weights_only=False)
        train.gen.set_state(extra["gen"])
        epochs, cpu_s, wall_s, passes = (extra["epochs"], extra["cpu_s"], extra["wall_s"],
                                         extra["passes"])
    last = target_epochs(method, study, phase)
    for epoch in range(len(epochs), last):
        _sync(study)
        c0, w0 = time.process_time(), time.perf_counter()
        record = trainer.fit_epoch(train, losses)
        _sync(study)
        cpu_s += time.process_time() - c0
        wall_s += time.perf_counter() - w0
        passes += float(record.get("passes", 1))
        with _autocast(study, name):  # the test set only at the budgets' epochs (CPU time)
            val_m = h.evaluate(surgeon, val, recipe)
            test_m = (h.evaluate(surgeon, test, recipe)
                      if epoch + 1 in (study.epochs, last) else None)
        epochs.append({"epoch": epoch + 1, "passes": passes, "cpu_s": cpu_s, "wall_s": wall_s,
                       "loss": record.get("losses", {}), "val": val_m,
                       **({"test": test_m} if test_m is not None else {}),
                       **({"polarization": polarization(surgeon)}
                          if surgeon.importance_bank.trained else {})})
        # every epoch: a stopped run continues from here, a matched run extends this one
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(ckpt))
        torch.save({"gen": train.gen.get_state(), "epochs": epochs, "cpu_s": cpu_s,
                    "wall_s": wall_s, "passes": passes}, str(ckpt) + ".study")
    return {"study": study.name, "config": study.fingerprint(), "method": method, "seed": seed,
            "phase": phase, "epochs": epochs, "final": epochs[-1]["test"] if epochs else {},
            "cpu_s": cpu_s, "wall_s": wall_s, "passes": passes, "skipped": trainer.skipped,
            "precision": precision, "device": _device_name(study),
            "machine": f"{platform.machine()} threads={torch.get_num_threads()}",
            "torch": torch.__version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime())}


def polarization(surgeon: rs.Surgeon) -> float:
    """How far the dominance of the shared filters is from equal, in [0, 1]: the mean over
    filters of ``(max_t D_t - 1/T) / (1 - 1/T)`` (0: every filter equally shared, 1: every filter
    owned by one task), over the filters some task values."""
    bank = surgeon.importance_bank
    vals = []
    with torch.no_grad():
        for name in bank.names:
            d = bank.dominance(name)
            d = d.mean(-1) if d.dim() == 3 else d
            n = d.shape[0]
            live = d.sum(0) > 0  # filters no task values (D = 0) are left out
            if live.any():
                vals.append(((d.max(0).values[live] - 1 / n) / (1 - 1 / n)).mean())
    return float(torch.stack(vals).mean()) if vals else 0.0


def _device_name(study: Study) -> str:
    if torch.device(study.device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def run_study(study: Study, out: Path, methods: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None, phase: str = "epoch",
              deadline_s: float | None = None, log: Any = print) -> list[dict[str, Any]]:
    """Run every pending (seed, method) of ``study`` into ``out/runs.jsonl``; with
    ``deadline_s``, start no run that the runs so far say would end after it."""
    t_start = time.perf_counter()
    path = out / "runs.jsonl"
    methods = list(methods or all_methods(study))
    todo = pending(study, load_records(path), methods, list(seeds or study.seeds), phase)
    splits = load_splits(study)
    done: list[dict[str, Any]] = []
    took: dict[str, float] = {}
    for seed, method in todo:
        if deadline_s is not None:  # what this method took here, or in any worker's record
            known = {**{r["method"]: 1.2 * r["wall_s"] for r in load_records(path).values()
                        if r["study"] == study.name}, **took}
            guess = known.get(method, max(known.values(), default=0.0))
            if time.perf_counter() - t_start + guess > deadline_s:
                log(f"deadline: not starting {method} seed {seed} (about {guess:.0f} s)")
                continue
        with claim(out, f"{study.name}/{method}/{seed}") as mine:
            if not mine:
                log(f"{method} seed {seed}: another worker holds it, skipped")
                continue
            if not pending(study, load_records(path), [method], [seed], phase):
                continue  # finished by another worker meanwhile
            t0 = time.perf_counter()
            rec = run_one(study, method, seed, splits, out, phase)
            took[method] = time.perf_counter() - t0
            append_record(path, rec)
            done.append(rec)
            acc = ", ".join(f"{k} {v:.4f}" for k, v in rec["final"].items())
            log(f"{study.name} {method} seed {seed}: {acc} ({rec['cpu_s']:.0f} cpu s, "
                f"{len(rec['epochs'])} epochs)")
    return done


# -- command line -------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=sorted(STUDIES), default="r1-fashion-lenet")
    p.add_argument("--gpu-preset", action="store_true",
                   help="the one-GPU study (gpu-r1-fashion-resnet18, 8-minute deadline)")
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    p.add_argument("--methods", nargs="+", help="method specs (name or name:key=value,...)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--phase", choices=["epoch", "matched"], default="epoch")
    p.add_argument("--epochs", type=int, help="override the study's epochs (a new study name)")
    p.add_argument("--device", help="override the study's device (e.g. cpu for a dry run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true",
                   help="the chosen study shrunk to seconds on the CPU (tests, dry runs)")
    p.add_argument("--deadline-min", type=float, help="start no run that would end after it")
    p.add_argument("--estimate", action="store_true",
                   help="time a few steps per method and print the study's cost; train nothing")
    p.add_argument("--estimate-steps", type=int, default=8)
    return p.parse_args(argv)


def chosen_study(a: argparse.Namespace) -> Study:
    study = STUDIES["gpu-r1-fashion-resnet18" if a.gpu_preset else a.study]
    if a.epochs is not None:
        study = replace(study, name=f"{study.name}-e{a.epochs}", epochs=a.epochs)
    if a.device is not None:
        study = replace(study, device=a.device)
    if a.tiny:
        study = tiny(study)
    if study.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"study {study.name!r} needs a CUDA device and none is available: "
                         f"run it on a GPU machine, or pass --device cpu for a (slow) dry run")
    return study


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    study = chosen_study(a)
    if a.estimate:
        import study_estimate

        print(study_estimate.report(study, a.methods or all_methods(study), a.phase,
                                    a.estimate_steps))
        return []
    deadline = a.deadline_min * 60 if a.deadline_min else (7.5 * 60 if a.gpu_preset else None)
    print(f"study {study.name}: {asdict(study)}; phase {a.phase}; out {a.out}", flush=True)
    return run_study(study, a.out, a.methods, a.seeds, a.phase, deadline,
                     log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
