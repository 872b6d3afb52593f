from ..registry import Registry

DATASETS = Registry("dataset", "kbricks.datasets")
SCENARIOS = Registry("scenario", "kbricks.scenarios")
