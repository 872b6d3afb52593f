"""Datasets (embedded, procedural, on-disk), tasks, continual scenarios and per-batch augmentations.
Nothing is downloaded."""

from . import dsprites, embedded, formats, inmemory, scenarios  # noqa: F401  (registers datasets and scenarios)
from .augment import BatchAugment, channel_stats, normalize, random_crop, random_hflip
from .base import ArrayDataset, DataSplits, image_size_of, input_shape_of, stratified_split
from .inmemory import python_splits
from .registry import DATASETS, SCENARIOS
from .scenarios import TaskData, build_scenario
from .tasks import Task, build_tasks, class_partition, latent_tasks, split_classes


def load_dataset(name: str, **kwargs) -> DataSplits:
    """``load_dataset("digits")`` -> DataSplits(train, test). Unknown names list the valid ones."""
    return DATASETS.create(name, **kwargs)


def list_datasets(pattern: str = "*"):
    return DATASETS.names(pattern)


def list_scenarios(pattern: str = "*"):
    return SCENARIOS.names(pattern)


__all__ = [
    "ArrayDataset", "DataSplits", "Task", "TaskData", "BatchAugment", "DATASETS", "SCENARIOS", "build_scenario",
    "build_tasks", "class_partition", "latent_tasks", "split_classes", "load_dataset", "list_datasets",
    "list_scenarios", "channel_stats", "normalize", "random_crop", "random_hflip", "stratified_split", "python_splits",
    "image_size_of", "input_shape_of",
]
