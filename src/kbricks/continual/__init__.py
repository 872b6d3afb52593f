"""Continual learning: the strategy template (dense defaults, plugins; SupermaskStrategy for supermask methods),
SupSup, ImpressLearn, the baselines (dense fine-tuning, EWC, LwF, experience replay), inference without a task id,
CL metrics. The task loop that drives a strategy is the engine's (``kbricks.engine.continual``)."""

from .ewc import EWC, EWCPlugin
from .finetune import Finetune
from .impresslearn import ImpressLearn
from .inference import infer_task, refit_coefficients
from .lwf import LwF, LwFPlugin
from .metrics import cl_metrics
from .plugins import ContinualPlugin
from .replay import ExperienceReplay, ReplayPlugin
from .strategy import ContinualStrategy, DenseParams, Stage, SupermaskStrategy
from .supsup import SupSup

__all__ = ["ContinualPlugin", "ContinualStrategy", "DenseParams", "EWC", "EWCPlugin", "ExperienceReplay", "Finetune", "ImpressLearn",
           "LwF", "LwFPlugin", "ReplayPlugin", "Stage", "SupSup", "SupermaskStrategy", "cl_metrics", "infer_task", "refit_coefficients"]
