"""The engine: from a config to a run directory. ``experiment`` builds data, tasks and the method; ``trainer`` runs
one optimisation loop (and a whole training run); ``continual`` runs a task sequence on the same loop; ``evaluate``
scores finished runs; ``sweep`` repeats a run over seeds."""
