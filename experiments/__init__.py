"""Experiments on top of ``models``, ``parallel`` and ``fpdt_kernels``: sweeps, training, the
planner, figures and benchmarks.

Packages import only downwards, in this order (a package may import those above it):

1. ``core``: paths, tables, units, FLOPs, hardware presets, memory accounting, provenance.
2. ``training``: precision, data, schedule, the step (``loop``), the trainer, checkpoints.
3. ``sweep``: the config schema, a point, launching its ranks, recording its row (``run``, ``max_seqlen``).
4. ``planner``: the first-principles memory and time model.
5. ``figures``: plots of rows, predictions and curves (and the sweep's figure callback).
6. ``bench``: benchmarks; ``gpu``: the prepared GPU scripts; and the entry modules here (``run``,
   ``train``, ``plan``, ``plot``, ...).
"""

# The order above, checked by tests/test_package_layers.py.
LAYERS = ("core", "training", "sweep", "planner", "figures", "bench", "gpu")
