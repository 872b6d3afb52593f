from ..registry import Registry

DATASETS = Registry("dataset")
