"""The newer baselines (methods/aggregators.py, methods/scalarizers.py) against slow, plain
references of their papers' update rules, over several steps (their state), plus exact
checkpoint resume (also mid-epoch), the method's own random stream, and two gloo processes
equal to one process (slow).

torchjd computes the algorithms; what these tests pin down is what routesurgeon adds or chooses:
which Jacobian each weighting sees (modo/sdmgrad pair this step's with the previous step's),
that the state carried across steps evolves as the paper says, the per-epoch schedules of dwa and
stch, the coefficients of the loss-value scalarisers, and that exclusive parameters get their
own task's gradient. References use float64 lists and loops, not torchjd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import routesurgeon as rs
from routesurgeon.methods.registry import get_method_class
from routesurgeon.trainer import Trainer

NEW = ("aligned-mtl", "config", "dualproj", "dwa", "excess-mtl", "fairgrad", "geometric-mean",
       "graddrop", "gradvac", "modo", "rlw", "sdmgrad", "stch")
TASKS = ("p", "q")


class Mlp(nn.Module):
    """A linear trunk shared by two linear heads (tasks p and q)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 6)
        self.h1, self.h2 = nn.Linear(6, 2), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.l1(x))
        return {"p": self.h1(z), "q": self.h2(z)}


def _batch(k: int) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    return x, {"p": torch.randn(8, 2, generator=g, dtype=torch.float64),
               "q": 2 * torch.randn(8, 3, generator=g, dtype=torch.float64)}


def _setup(method: str, **config: Any) -> tuple[rs.Surgeon, Any]:
    torch.manual_seed(0)
    s = rs.instrument(Mlp().double(), torch.zeros(2, 5, dtype=torch.float64))
    return s, get_method_class(method)(s, **config)


def _losses(s: rs.Surgeon, k: int) -> dict[str, Tensor]:
    x, y = _batch(k)
    out = s(x)
    return {t: F.mse_loss(out[t], y[t]) for t in TASKS}


def _task_grads(s: rs.Surgeon, losses: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Each task's gradient on every parameter (zeros where it does not reach)."""
    named = dict(s.model.named_parameters())
    out = {}
    for t in TASKS:
        gs = torch.autograd.grad(losses[t], list(named.values()), retain_graph=True,
                                 allow_unused=True)
        out[t] = {n: torch.zeros_like(p) if g is None else g
                  for (n, p), g in zip(named.items(), gs, strict=True)}
    return out


def _shared_names(s: rs.Surgeon, m: Any) -> list[str]:
    ids = {id(p) for p in m.shared}
    return [n for n, p in s.model.named_parameters() if id(p) in ids]


def _jacobian(grads: dict[str, dict[str, Tensor]], names: list[str]) -> list[Tensor]:
    return [torch.cat([grads[t][n].flatten() for n in names]) for t in TASKS]


def _expected_aggregate(s: rs.Surgeon, m: Any, grads: dict[str, dict[str, Tensor]],
                        d: Tensor) -> dict[str, Tensor]:
    """Shared parameters: the aggregate ``d`` (split); exclusive ones: their task's gradient."""
    names = _shared_names(s, m)
    want, offset = {}, 0
    params = dict(s.model.named_parameters())
    for n in names:
        k = params[n].numel()
        want[n] = d[offset:offset + k].view_as(params[n])
        offset += k
    for n in params:
        if n not in want:
            want[n] = sum(grads[t][n] for t in TASKS)
    return want


def _check_and_step(s: rs.Surgeon, want: dict[str, Tensor], lr: float = 0.2) -> None:
    for n, p in s.model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, want[n], rtol=1e-7, atol=1e-9, msg=n)
    with torch.no_grad():  # plain SGD, the same for method and reference
        for p in s.model.parameters():
            p -= lr * p.grad
            p.grad = None


def _run_aggregator(method: str, reference: Callable[[list[Tensor]], Tensor], steps: int = 3,
                    epoch_steps: int | None = None, **config: Any) -> None:
    s, m = _setup(method, **config)
    for k in range(steps):
        losses = _losses(s, k)
        grads = _task_grads(s, losses)
        d = reference(_jacobian(grads, _shared_names(s, m)))
        m.backward(losses)
        _check_and_step(s, _expected_aggregate(s, m, grads, d))
        if epoch_steps and (k + 1) % epoch_steps == 0:
            m.end_epoch()


# -- plain references -----------------------------------------------------------------------------

def _dot(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum())


def _simplex(v: list[float]) -> list[float]:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008), sort-based."""
    u = sorted(v, reverse=True)
    css, theta = 0.0, 0.0
    for j, uj in enumerate(u, 1):
        css += uj
        t = (css - 1.0) / j
        if uj - t > 0:
            theta = t
    return [max(x - theta, 0.0) for x in v]


def _combine(w: list[float], rows: list[Tensor]) -> Tensor:
    return sum(wi * r for wi, r in zip(w, rows, strict=True))  # type: ignore[return-value]


def test_modo_weights_from_this_and_the_previous_batch() -> None:
    gamma, rho = 0.5, 0.1
    lam = [0.5, 0.5]
    prev: list[Tensor] = []

    def ref(rows: list[Tensor]) -> Tensor:
        nonlocal lam, prev
        other = prev or rows  # the first step pairs the batch with itself
        a = [[_dot(rows[i], other[j]) for j in range(2)] for i in range(2)]
        grad = [sum(a[i][j] * lam[j] for j in range(2)) + rho * lam[i] for i in range(2)]
        lam = _simplex([lam[i] - gamma * grad[i] for i in range(2)])
        prev = rows
        return _combine(lam, rows)

    _run_aggregator("modo", ref, steps=4, gamma=gamma, rho=rho)


def test_sdmgrad_inner_solver_on_the_paired_batches() -> None:
    lam_, lr, mom, iters = 0.3, 10.0, 0.5, 20
    w = [0.5, 0.5]
    prev: list[Tensor] = []

    def ref(rows: list[Tensor]) -> Tensor:
        nonlocal w, prev
        other = prev or rows
        a = [[_dot(rows[i], other[j]) for j in range(2)] for i in range(2)]
        scale = sum(math.sqrt(max(a[i][i], 0.0)) for i in range(2)) / 2
        a = [[x / (scale**2 + 1e-8) for x in r] for r in a]
        v: list[float] | None = None
        for _ in range(iters):
            target = [w[j] + lam_ / 2 for j in range(2)]
            g = [sum(a[i][j] * target[j] for j in range(2)) for i in range(2)]
            v = g if v is None else [mom * v[i] + g[i] for i in range(2)]
            w = _simplex([w[i] - lr * v[i] for i in range(2)])
        prev = rows
        return _combine([(w[i] + lam_ / 2) / (1 + lam_) for i in range(2)], rows)

    _run_aggregator("sdmgrad", ref, steps=3)


@pytest.mark.parametrize("warmup_epochs", [0, 1])
def test_excess_mtl_exponentiated_weights_from_adagrad_excess_risks(warmup_epochs: int) -> None:
    eta, epoch_steps = 1.0, 2
    warm = warmup_epochs * epoch_steps  # steps of uniform weights collecting the baseline
    weights = [0.5, 0.5]
    sq: list[Tensor] = []
    warm_sum = [0.0, 0.0]
    base: list[float] = []
    step = 0

    def ref(rows: list[Tensor]) -> Tensor:
        nonlocal weights, step
        for i, r in enumerate(rows):
            if len(sq) < 2:
                sq.append(torch.zeros_like(r))
            sq[i] = sq[i] + r * r
        risk = [float((r * r / torch.sqrt(sq[i] + 1e-7)).sum()) for i, r in enumerate(rows)]
        step += 1
        if step <= warm:
            warm_sum[0] += risk[0]
            warm_sum[1] += risk[1]
            return _combine([0.5, 0.5], rows)
        if not base and warm:
            base.extend(v / warm for v in warm_sum)  # the warm-up's mean risks
        if not base:
            base.extend(risk)  # no warm-up: the first step's risks are the baseline, used raw
        else:
            risk = [risk[i] / (base[i] + 1e-7) for i in range(2)]
        logits = [math.log(weights[i]) + eta * risk[i] for i in range(2)]
        z = sum(math.exp(x - max(logits)) for x in logits)
        weights = [math.exp(x - max(logits)) / z for x in logits]
        return _combine(weights, rows)

    _run_aggregator("excess-mtl", ref, steps=5, epoch_steps=epoch_steps,
                    warmup_epochs=warmup_epochs)
    assert weights != [0.5, 0.5]


def test_gradvac_corrects_towards_the_ema_cosine_target() -> None:
    beta, eps = 0.5, 1e-8
    phi_hat = [[0.0, 0.0], [0.0, 0.0]]

    def ref(rows: list[Tensor]) -> Tensor:
        out = []
        for i in range(2):
            j = 1 - i  # two tasks: the visiting order does not matter
            gi, gj = rows[i].clone(), rows[j]
            ni, nj = gi.norm().item(), gj.norm().item()
            phi = _dot(gi, gj) / (ni * nj + eps)
            hat = phi_hat[i][j]
            if phi < hat:
                w = ni * (hat * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - hat**2)) / (
                    nj * math.sqrt(1 - hat**2) + eps)
                gi = gi + w * gj
            phi_hat[i][j] = (1 - beta) * hat + beta * phi
            out.append(gi)
        return out[0] + out[1]

    _run_aggregator("gradvac", ref, steps=4)
    # conflicting rows: the first step is PCGrad's projection (target 0)
    rows = [torch.tensor([1.0, 0.0], dtype=torch.float64),
            torch.tensor([-1.0, 1.0], dtype=torch.float64)]
    phi_hat = [[0.0, 0.0], [0.0, 0.0]]
    got = ref(rows)
    pc = [rows[0] - _dot(rows[0], rows[1]) / _dot(rows[1], rows[1]) * rows[1],
          rows[1] - _dot(rows[1], rows[0]) / _dot(rows[0], rows[0]) * rows[0]]
    torch.testing.assert_close(got, pc[0] + pc[1])


def _one_step(method: str, **config: Any) -> tuple[list[Tensor], Tensor]:
    """The Jacobian rows of one step and the aggregate the method wrote (checked against the
    exclusive parameters' own gradients on the way)."""
    s, m = _setup(method, **config)
    losses = _losses(s, 0)
    grads = _task_grads(s, losses)
    names = _shared_names(s, m)
    rows = _jacobian(grads, names)
    m.backward(losses)
    params = dict(s.model.named_parameters())
    for n, p in params.items():
        if n not in names:
            torch.testing.assert_close(p.grad, sum(grads[t][n] for t in TASKS), msg=n)
    return rows, torch.cat([params[n].grad.flatten() for n in names])


def test_fairgrad_solves_the_alpha_fair_condition() -> None:
    # FairGrad's weights solve (J J^T) w = w^(-1/alpha), so J d = w^(-1/alpha) for d = J^T w
    rows, d = _one_step("fairgrad")
    jd = [_dot(r, d) for r in rows]
    a = torch.stack(rows)
    w = torch.linalg.lstsq(a.T, d[:, None]).solution.flatten().tolist()  # d's row weights
    assert all(x > 0 for x in w)
    for i in range(2):
        assert jd[i] == pytest.approx(w[i] ** (-1 / 2.0), rel=1e-4)


def test_config_has_equal_cosine_with_every_task_gradient() -> None:
    rows, d = _one_step("config")
    cos = [_dot(r, d) / (r.norm().item() * d.norm().item()) for r in rows]
    assert cos[0] == pytest.approx(cos[1], rel=1e-9) and cos[0] > 0
    # its length: the sum of the projections of the rows on its direction (ConFIG, Eq. 2)
    unit = d / d.norm()
    assert d.norm().item() == pytest.approx(sum(_dot(r, unit) for r in rows), rel=1e-9)


def test_dualproj_increases_no_task_loss_and_stays_near_the_mean() -> None:
    rows, d = _one_step("dualproj")
    assert all(_dot(r, d) >= -1e-9 for r in rows)
    mean = (rows[0] + rows[1]) / 2
    if all(_dot(r, mean) >= 0 for r in rows):  # no conflict: the mean itself
        torch.testing.assert_close(d, mean)


def test_aligned_mtl_aligns_the_singular_values() -> None:
    rows, d = _one_step("aligned-mtl")
    a = torch.stack(rows)  # T x n
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    # Algorithm 1: the rows' Gramian rescaled to the smallest singular value, mean preferences
    want = (sv.min() * (u @ vh)).T @ torch.full((2,), 0.5, dtype=a.dtype)
    torch.testing.assert_close(d, want)


def test_graddrop_keeps_one_sign_per_coordinate() -> None:
    rows, d = _one_step("graddrop")
    pos = sum(r.clamp(min=0) for r in rows)
    neg = sum(r.clamp(max=0) for r in rows)
    assert all(torch.isclose(x, p) or torch.isclose(x, n) for x, p, n in zip(d, pos, neg))
    # mixed coordinates dropped both ways over the vector: the draw is not degenerate
    mixed = (pos > 0) & (neg < 0)
    assert bool(mixed.any())
    kept_pos = torch.isclose(d, pos) & mixed
    assert 0 < int(kept_pos.sum()) < int(mixed.sum())


# -- scalarisers ----------------------------------------------------------------------------------

def _run_scalarizer(method: str, coefficients: Callable[[int, int, list[float]], list[float]],
                    epochs: int, steps: int, **config: Any) -> Any:
    """Train ``epochs`` x ``steps`` with plain SGD; at each step the gradient must be
    ``sum_i c_i grad(loss_i)`` with ``c = coefficients(epoch, step, losses)``."""
    s, m = _setup(method, **config)
    for e in range(epochs):
        for k in range(steps):
            losses = _losses(s, e * steps + k)
            grads = _task_grads(s, losses)
            c = coefficients(e, k, [float(losses[t].detach()) for t in TASKS])
            m.backward(losses)
            want = {n: sum(ci * grads[t][n] for ci, t in zip(c, TASKS, strict=True))
                    for n in grads[TASKS[0]]}
            _check_and_step(s, want, lr=0.05)
        m.end_epoch()
    return m


def test_dwa_weights_from_the_two_previous_epoch_means() -> None:
    temp = 2.0
    means: list[list[float]] = []
    seen: list[list[float]] = []

    def coeff(e: int, k: int, losses: list[float]) -> list[float]:
        if k == 0 and seen:  # a new epoch: the previous one's mean losses
            means.append([sum(x[i] for x in seen) / len(seen) for i in range(2)])
            seen.clear()
        seen.append(losses)
        if len(means) < 2:
            return [1.0, 1.0]
        r = [means[-1][i] / means[-2][i] for i in range(2)]
        z = sum(math.exp(x / temp) for x in r)
        return [2 * math.exp(x / temp) / z for x in r]

    _run_scalarizer("dwa", coeff, epochs=4, steps=2)
    assert len(means) == 3


def test_stch_log_warmup_then_smooth_tchebycheff_on_the_nadir_normalised_losses() -> None:
    mu, warm = 0.5, 1
    nadir_sum = [0.0, 0.0]
    n = 0

    def coeff(e: int, k: int, losses: list[float]) -> list[float]:
        nonlocal n
        if e <= warm:
            if e == warm:
                nadir_sum[0] += losses[0]
                nadir_sum[1] += losses[1]
                n += 1
            return [1 / (x + 1e-20) for x in losses]
        z = [v / n for v in nadir_sum]
        y = [math.log(losses[i] / z[i] + 1e-20) for i in range(2)]
        soft = [math.exp(v / mu) / sum(math.exp(u / mu) for u in y) for v in y]
        return [2 * soft[i] / (z[i] * (losses[i] / z[i] + 1e-20)) for i in range(2)]

    m = _run_scalarizer("stch", coeff, epochs=4, steps=2, mu=mu, warmup_epochs=warm)
    assert m.nadir is not None and m.epoch == 4


def test_geometric_mean_coefficients() -> None:
    def coeff(e: int, k: int, losses: list[float]) -> list[float]:
        gm = math.exp(sum(math.log(x) for x in losses) / 2)
        return [gm / (2 * x) for x in losses]

    _run_scalarizer("geometric-mean", coeff, epochs=1, steps=3)


def test_log_scalarisers_refuse_negative_losses() -> None:
    for method in ("stch", "geometric-mean"):
        s, m = _setup(method)
        losses = _losses(s, 0)
        losses["q"] = -losses["q"]
        with pytest.raises(rs.LossError, match=r"tasks \['q'\] are negative"):
            m.backward(losses)


def test_rlw_draws_softmax_normal_weights_from_its_own_stream() -> None:
    s, m = _setup("rlw")
    gen = torch.Generator().manual_seed(m.stream.seed)

    def coeff(e: int, k: int, losses: list[float]) -> list[float]:
        return torch.softmax(torch.randn(2, generator=gen, dtype=torch.float64), 0).tolist()

    m2 = _run_scalarizer("rlw", coeff, epochs=1, steps=3)
    assert m2.stream.seed == m.stream.seed  # a function of torch.initial_seed() and the name
    losses = _losses(s, 0)
    global_before = torch.get_rng_state()
    m.backward(losses)
    assert torch.equal(torch.get_rng_state(), global_before)  # the global stream is untouched
    torch.manual_seed(1)
    assert get_method_class("rlw")(s).stream.seed != m.stream.seed  # another run seed


# -- checkpoints ----------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.ha, self.hb = nn.Linear(4, 3), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = F.relu(self.c1(x)).mean((2, 3))
        return {"a": self.ha(z), "b": self.hb(z)}


TINY_LOSSES = {"a": F.cross_entropy, "b": lambda o, y: F.mse_loss(o.squeeze(1), y)}
# modo and sdmgrad with settings under which their weights carry over visibly between steps
STATEFUL = {"modo": {"gamma": 0.5}, "sdmgrad": {"n_iter": 1, "lr": 0.5}, "gradvac": {},
            "excess-mtl": {}, "graddrop": {}, "dwa": {}, "stch": {"warmup_epochs": 0}, "rlw": {}}


def _tiny_batches() -> list[tuple[Tensor, dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        x = torch.randn(6, 3, 5, 5, generator=g)
        out.append((x, {"a": (x[:, 0].mean((1, 2)) > 0).long(), "b": x[:, 1].mean((1, 2))}))
    return out


def _tiny_trainer(method: str, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    s = rs.instrument(Tiny(), torch.randn(2, 3, 5, 5))
    return Trainer(s, torch.optim.Adam(s.model_parameters(), lr=1e-2), method=method,
                   config=STATEFUL[method], progress=False)


class Crash(Exception):
    pass


def _fit(tr: Trainer, epochs: int, path: Path | None = None, crash_at: int | None = None
         ) -> dict[int, float]:
    log: dict[int, float] = {}

    def on_step(step: int, stats: dict[str, float]) -> None:
        log[step] = stats["loss/a"] + stats["loss/b"]
        if step == crash_at:
            raise Crash

    while tr.epoch < epochs:
        tr.fit_epoch(_tiny_batches(), TINY_LOSSES, on_step=on_step,
                     checkpoint=None if path is None else str(path), checkpoint_every=2)
    return log


@pytest.mark.parametrize("method", sorted(STATEFUL))
def test_stateful_methods_resume_mid_epoch_exactly(method: str, tmp_path: Path) -> None:
    ref_tr = _tiny_trainer(method)
    ref = _fit(ref_tr, 4)  # 3 batches an epoch: dwa's weights start in epoch 2, stch's in 1
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        _fit(_tiny_trainer(method), 4, path, crash_at=9)  # saved after step 8, in epoch 2
    s = _tiny_trainer(method, seed=7).surgeon  # other weights: everything comes from the file
    resumed = Trainer.resume(str(path), s, torch.optim.Adam(s.model_parameters(), lr=1e-2),
                             config=STATEFUL[method], progress=False)
    assert (resumed.step_count, resumed.epoch) == (8, 2)
    log = _fit(resumed, 4)
    assert sorted(log) == list(range(9, 13))
    for step, v in log.items():
        assert v == pytest.approx(ref[step], abs=1e-7, rel=0), (method, step)
    for (n, p), q in zip(ref_tr.surgeon.model.state_dict().items(),
                         resumed.surgeon.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)
    # and the method's state itself: a fresh trainer that skips it would differ
    fresh = _tiny_trainer(method, seed=7)
    fresh.surgeon.model.load_state_dict(ref_tr.surgeon.model.state_dict())
    assert _differs(ref_tr.method.state_dict(), fresh.method.state_dict()), method


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                    and torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() != b.keys() or any(_differs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return bool(a != b)


def test_every_new_method_is_registered_with_a_cited_docstring() -> None:
    names = rs.available_methods()
    for method in NEW:
        assert method in names
        doc = get_method_class(method).__doc__ or ""
        assert any(str(y) in doc for y in range(2017, 2026)), method  # cites its paper's year


# -- torch.distributed ----------------------------------------------------------------------------

WORLD = 2
DIST_CONFIG: dict[str, dict[str, Any]] = {"stch": {"warmup_epochs": 0}}
DIST_EPOCHS = 3  # one batch an epoch: dwa's weights start in epoch 2, stch's smooth phase in 1
# the new methods whose data-parallel path is their own: global loss values (dwa, stch,
# geometric-mean), rank 0's random stream (rlw, graddrop, gradvac), state from the global
# Jacobian (modo, sdmgrad, excess-mtl); the stateless aggregators take AggregatorMethod's path
DIST_METHODS = ("dwa", "excess-mtl", "geometric-mean", "graddrop", "gradvac", "modo", "rlw",
                "sdmgrad", "stch")
# measured: 1e-7 or less, except sdmgrad (losses 1e-7, weights 7e-6 after 3 Adam steps): its 20
# momentum steps at lr 10 on the simplex amplify the float32 rounding of the all-reduced Jacobian
DIST_TOL = {"sdmgrad": 5e-5}


def _dist_batches() -> list[tuple[Tensor, dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(1):
        x = torch.randn(8, 3, 5, 5, generator=g)
        out.append((x, {"a": (x[:, 0].mean((1, 2)) > 0).long(), "b": x[:, 1].mean((1, 2))}))
    return out


def _dist_run(method: str, seed: int, batches: list[Any]) -> dict[str, Any]:
    torch.manual_seed(seed)
    s = rs.instrument(Tiny(), torch.randn(2, 3, 5, 5))
    tr = Trainer(s, torch.optim.Adam(s.model_parameters(), lr=1e-2), method=method,
                 config=DIST_CONFIG.get(method, {}), progress=False)
    losses: list[float] = []
    for _ in range(DIST_EPOCHS):
        tr.fit_epoch(batches, TINY_LOSSES,
                     on_step=lambda _, st: losses.append(st["loss/a"] + st["loss/b"]))
    return {"losses": losses, "state": {k: v.clone() for k, v in s.model.state_dict().items()},
            "bytes": dict(tr.comm.by_kind)}


def _dist_worker(rank: int, tmp: Path) -> None:
    import torch.distributed as dist

    from routesurgeon.distributed import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'pg'}", rank=rank,
                            world_size=WORLD)
    try:
        mine = [shard(b) for b in _dist_batches()]
        # other seeds on every rank: the trainer's broadcast and rank 0's stream fix them
        out = {m: _dist_run(m, 60 + rank, mine) for m in DIST_METHODS}
        torch.save(out, tmp / f"new{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_new_methods_under_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    import multiprocessing as mp

    ref = {m: _dist_run(m, 60, _dist_batches()) for m in DIST_METHODS}
    ctx = mp.get_context("spawn")  # not forked (see tests/test_distributed.py)
    procs = [ctx.Process(target=_dist_worker, args=(r, tmp_path)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * WORLD
    r0, r1 = (torch.load(tmp_path / f"new{r}.pt", weights_only=True) for r in range(WORLD))
    for m in DIST_METHODS:
        for k, v in r0[m]["state"].items():  # every rank applies the same update
            assert torch.equal(v, r1[m]["state"][k]), (m, k)
        assert len(r0[m]["losses"]) == DIST_EPOCHS
        tol = DIST_TOL.get(m, 1e-6)
        assert r0[m]["losses"] == pytest.approx(ref[m]["losses"], abs=tol), m
        for k, v in r0[m]["state"].items():
            torch.testing.assert_close(v, ref[m]["state"][k], rtol=0, atol=tol, msg=f"{m} {k}")
        sent = r0[m]["bytes"]
        linear = m in ("dwa", "geometric-mean", "rlw", "stch")
        assert ("gradients" in sent) == linear and ("jacobian" in sent) != linear, (m, sent)
