"""The parts of ``routesurgeon.importance``, one concept per module.

- ``algebra``: ``RouteConfig`` and the dynamic-route equations (lrn, gate, gated weight,
  dominance);
- ``kernels``: the gated-kernel autograd functions and the gated layer call.

``routesurgeon.importance`` keeps ``ImportanceBank`` and re-exports every name of these.
"""
