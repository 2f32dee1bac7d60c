"""Training methods: DR-MGF, its per-step variant and the de-conflict baselines.

Every method is looked up by name in one registry (``get_method``), so comparing methods on the
same instrumented model means changing one string.
"""
