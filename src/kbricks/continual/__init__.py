"""Continual learning with supermasks: scenarios, SupSup, ImpressLearn, task inference, CL metrics."""

from .methods import CL_METHODS, ImpressLearn, SupSup
from .metrics import cl_metrics
from .runner import ContinualConfig, load_continual_config, run_continual
from .scenarios import SCENARIOS, build_scenario

__all__ = ["CL_METHODS", "SCENARIOS", "ContinualConfig", "ImpressLearn", "SupSup", "build_scenario", "cl_metrics", "load_continual_config", "run_continual"]
