"""Loss validation, finiteness checks and the diagnosis of where non-finite values appear."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from routesurgeon.conflicts import LossFn as LossFn
from routesurgeon.conflicts import _check_loss_fns as _check_loss_fns
from routesurgeon.errors import LossError
from routesurgeon.outputs import leaf_values
from routesurgeon.surgeon import Surgeon

__all__ = ["LossFn", "all_finite", "check_losses", "diagnose_nonfinite"]


def check_losses(tasks: list[str], losses: Mapping[str, Tensor]) -> None:
    """Validate a losses dict: one scalar tensor per task (finiteness is the caller's)."""
    missing = [t for t in tasks if t not in losses]
    unknown = [k for k in losses if k not in tasks]
    if unknown:
        raise LossError(f"losses for unknown tasks {unknown}; tasks are {tasks}")
    if missing:
        raise LossError(f"losses missing for tasks {missing}; every task needs a loss: {tasks}")
    for t in tasks:
        v = losses[t]
        if not isinstance(v, Tensor) or v.dim() != 0:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise LossError(f"loss of task {t!r} must be a scalar tensor, got {shape}; "
                            f"reduce it (e.g. .mean()) first")


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one synchronisation when it is.

    The L2 norms of the floating-point tensors (``torch._foreach_norm``, one fused kernel) are
    checked together: a NaN or infinite element makes its norm non-finite. A norm can also
    overflow on large finite values, so a non-finite norm is confirmed element by element
    (``torch.isfinite``) on that tensor before it counts. Other tensors are checked alone.
    """
    tensors = [t for t in tensors if t.numel()]  # empty: finite
    fused = [t.is_floating_point() and t.layout == torch.strided for t in tensors]
    floats = [t.detach() for t, f in zip(tensors, fused, strict=True) if f]
    others = [t for t, f in zip(tensors, fused, strict=True) if not f]
    if floats:
        norms = torch._foreach_norm(floats, 2)
        by_device: dict[torch.device, list[int]] = {}
        for i, n in enumerate(norms):
            by_device.setdefault(n.device, []).append(i)
        for idx in by_device.values():
            ok = torch.isfinite(torch.stack([norms[i].float() for i in idx]))
            if not bool(ok.all()):
                suspects = [i for i, good in zip(idx, ok.tolist(), strict=True) if not good]
                if not all(bool(torch.isfinite(floats[i]).all()) for i in suspects):
                    return False
    return all(bool(torch.isfinite(t).all()) for t in others)


# -- diagnosis -------------------------------------------------------------------------------------
def diagnose_nonfinite(surgeon: Surgeon, args: Sequence[Any], targets: Mapping[str, Any],
                       loss_fns: Mapping[str, LossFn]) -> str:
    """Name the task and layer where non-finite values first appear on this batch.

    Runs the forward with an fx interpreter (first node whose output is non-finite), then each
    task's loss, then each task's gradient on the parameters (the layer nearest the output whose
    gradient is non-finite). BN statistics and the RNG are restored: nothing is changed.
    """
    import torch.fx as fx

    gm = surgeon.graph_module
    first: list[str] = []

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if (not first and isinstance(out, Tensor) and out.is_floating_point()
                    and not torch.isfinite(out).all()):
                first.append(f"input {n.target!r}" if n.op == "placeholder" else
                             f"layer {n.target!r}" if n.op == "call_module" else
                             f"op {n.name!r} ({n.target})")
            return out

    buffers = {k: v.clone() for k, v in surgeon.model.state_dict().items()}
    rng = torch.random.get_rng_state()
    try:
        with torch.enable_grad():
            out = Probe(gm).run(*args)
            outs = {t: leaf_values(out, surgeon.outputs.task_outputs)[o]
                    for t, o in zip(surgeon.tasks, surgeon.outputs.task_outputs)}
            if first:
                bad = [t for t, v in outs.items() if not torch.isfinite(v).all()]
                return (f"Non-finite values first appear in the forward at {first[0]} "
                        f"(outputs of tasks {bad} non-finite).")
            losses = {t: loss_fns[t](outs[t], targets[t]) for t in surgeon.tasks}
            bad = [t for t, v in losses.items() if not torch.isfinite(v).all()]
            if bad:
                return (f"The model's outputs are finite; the loss function of task {bad[0]!r} "
                        f"returns a non-finite value.")
            named = [(n, p) for n, p in surgeon.model.named_parameters() if p.requires_grad]
            order = {str(n.target): i for i, n in enumerate(gm.graph.nodes)
                     if n.op in ("call_module", "get_attr")}
            for t in surgeon.tasks:
                grads = torch.autograd.grad(losses[t], [p for _, p in named], retain_graph=True,
                                            allow_unused=True)
                layers = {n.rsplit(".", 1)[0] if "." in n else n for (n, _), g in zip(named, grads)
                          if g is not None and not torch.isfinite(g).all()}
                if layers:
                    near = max(layers, key=lambda m: order.get(m, -1))
                    return (f"Task {t!r} back-propagates a non-finite gradient; it first reaches "
                            f"layer {near!r} (layers hit: {sorted(layers)[:5]}).")
        return "The batch is finite on a fresh forward/backward (the fault is not reproducible)."
    finally:
        with torch.no_grad():
            surgeon.model.load_state_dict(buffers)
        torch.random.set_rng_state(rng)
