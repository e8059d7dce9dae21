"""Training machinery shared by ``experiments.run`` (short measured runs) and ``experiments.train``
(long runs with checkpoints): precision, data, learning-rate schedule, the step, checkpoints."""
