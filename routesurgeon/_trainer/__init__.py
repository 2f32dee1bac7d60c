"""The parts of ``routesurgeon.trainer.Trainer``, one concept per module.

- ``nonfinite``: loss validation, the fused finiteness check and the non-finite diagnosis;
- ``base``: the attributes every part relies on and which parameters are trained;
- ``plumbing``: precision (autocast, GradScaler), compile and torch.distributed plumbing;
- ``step``: the step-level core (losses checked, method backward, gradient guard, skip);
- ``state``: checkpoints (state dict, save/load);
- ``epoch``: the epoch loop (mid-epoch resume) and evaluation.

``routesurgeon.trainer`` assembles them into ``Trainer`` and re-exports the public names.
"""
