"""Continual learning: the strategy template, SupSup, ImpressLearn, the dense fine-tuning baseline, inference
without a task id, CL metrics. The task loop that drives a strategy is the engine's (``kbricks.engine.continual``)."""

from .finetune import Finetune
from .impresslearn import ImpressLearn
from .inference import infer_task, refit_coefficients
from .metrics import cl_metrics
from .strategy import ContinualStrategy, Stage
from .supsup import SupSup

__all__ = ["ContinualStrategy", "Finetune", "ImpressLearn", "Stage", "SupSup", "cl_metrics", "infer_task", "refit_coefficients"]
