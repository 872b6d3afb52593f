"""The engine: from a config to a run directory. ``experiment`` builds data, tasks and the method; ``run`` is the
life of one run (open, resume, record, fit); ``loop`` is the one optimisation loop; ``trainer`` a plain run and
``continual`` a task sequence on that loop; ``card`` writes model.json; ``evaluate`` scores finished runs;
``export`` writes TorchScript / ONNX; ``sweep`` repeats a run over seeds. The engine imports no method."""
