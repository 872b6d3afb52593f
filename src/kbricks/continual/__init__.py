"""Continual learning with supermasks: the strategy template, SupSup, ImpressLearn, task inference, CL metrics.
The task loop that drives a strategy is the engine's (``kbricks.engine.continual``)."""

from .impresslearn import ImpressLearn
from .inference import infer_task
from .metrics import cl_metrics
from .strategy import ContinualStrategy, Stage
from .supsup import SupSup

__all__ = ["ContinualStrategy", "ImpressLearn", "Stage", "SupSup", "cl_metrics", "infer_task"]
