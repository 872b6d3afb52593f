"""Continual-learning scenarios from the embedded data: Permuted / Rotated MNIST-5k, Split MNIST / Split digits.

Each task has its own train/test ``ArrayDataset`` with labels in the task's own space. Inputs are transformed
once at build time (permutation, rotation), so a task's data is fixed and identical across runs and seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

from ..data import ArrayDataset, load_dataset, split_classes
from ..errors import ConfigError
from ..registry import Registry

SCENARIOS = Registry("scenario")


@dataclass
class TaskData:
    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int


def _permute(ds: ArrayDataset, perm: torch.Tensor) -> ArrayDataset:
    n, c, h, w = ds.x.shape
    x = ds.x.reshape(n, -1)[:, perm].reshape(n, c, h, w)
    return ArrayDataset(x, ds.y, ds.classes)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate images about their centre (bilinear, zero fill)."""
    if degrees % 360 == 0:
        return x.clone()
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@SCENARIOS.register("permuted")
def permuted(num_tasks: int = 5, dataset: str = "mnist5k", seed: int = 0) -> List[TaskData]:
    """Task 0 is the identity; task t uses a fixed random pixel permutation (seeded by ``seed`` and t)."""
    d = load_dataset(dataset)
    pixels = d.train.x[0].numel()
    tasks = []
    for t in range(num_tasks):
        perm = torch.arange(pixels) if t == 0 else torch.randperm(pixels, generator=torch.Generator().manual_seed(1000 * seed + t))
        tasks.append(TaskData(f"perm{t}", _permute(d.train, perm), _permute(d.test, perm), d.train.num_classes))
    return tasks


@SCENARIOS.register("rotated")
def rotated(num_tasks: int = 5, dataset: str = "mnist5k", degrees_per_task: float = 0.0, seed: int = 0) -> List[TaskData]:
    """Task t rotates every image by t * step degrees (step = 360 / num_tasks unless ``degrees_per_task`` is set)."""
    d = load_dataset(dataset)
    step = degrees_per_task or 360.0 / num_tasks
    return [
        TaskData(f"rot{int(round(t * step))}", ArrayDataset(rotate(d.train.x, t * step), d.train.y, d.train.classes),
                 ArrayDataset(rotate(d.test.x, t * step), d.test.y, d.test.classes), d.train.num_classes)
        for t in range(num_tasks)
    ]


@SCENARIOS.register("split")
def split(num_tasks: int = 5, dataset: str = "mnist5k", seed: int = 0) -> List[TaskData]:
    """Consecutive class groups ({0,1}, {2,3}, ...), each relabelled 0..k-1 (task-incremental)."""
    d = load_dataset(dataset)
    if d.train.num_classes % num_tasks:
        raise ConfigError(f"split: {d.train.num_classes} classes do not divide into {num_tasks} tasks")
    return [TaskData(t.name, t.select(d.train), t.select(d.test), t.num_classes) for t in split_classes(d.train.num_classes, num_tasks)]


def normalise(tasks: List[TaskData]) -> List[TaskData]:
    """Standardise every task with the first task's training statistics (one scalar mean/std)."""
    mean, std = tasks[0].train.x.mean().item(), tasks[0].train.x.std().item()
    out = []
    for t in tasks:
        out.append(TaskData(t.name, ArrayDataset((t.train.x - mean) / std, t.train.y, t.train.classes),
                            ArrayDataset((t.test.x - mean) / std, t.test.y, t.test.classes), t.num_classes))
    return out


def build_scenario(name: str, **kwargs) -> List[TaskData]:
    return normalise(SCENARIOS.create(name, **kwargs))
