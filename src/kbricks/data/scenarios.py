"""Continual-learning scenarios: a sequence of tasks made from one dataset (Permuted / Rotated / Split), e.g.
PermutedMNIST-5k or SplitDigits. A scenario is a function ``(data: DataSplits, **kwargs) -> List[TaskData]``
registered in ``SCENARIOS``; ``data`` is the run's dataset (``data.name``), so any dataset works.

Each task has its own train/test ``ArrayDataset`` with labels in the task's own space. Inputs are transformed
once at build time (permutation, rotation), so a task's data is fixed and identical across runs and seeds. Images
stay in [0, 1]; the engine normalises every task with the first task's training statistics (``data.augment``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import ArrayDataset, DataSplits
from .registry import SCENARIOS
from .tasks import class_partition, split_classes


@dataclass
class TaskData:
    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    classes: Optional[tuple] = None  # the dataset's class id of each task label (split); None: the labels are the dataset's own


def _permute(ds: ArrayDataset, perm: torch.Tensor) -> ArrayDataset:
    x = ds.x.reshape(len(ds), -1)[:, perm].reshape(ds.x.shape)  # images or feature vectors
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
def permuted(data: DataSplits, num_tasks: int = 5, seed: int = 0) -> List[TaskData]:
    """Task 0 is the identity; task t uses a fixed random pixel permutation (seeded by ``seed`` and t)."""
    pixels = data.train.x[0].numel()
    tasks = []
    for t in range(num_tasks):
        perm = torch.arange(pixels) if t == 0 else torch.randperm(pixels, generator=torch.Generator().manual_seed(1000 * seed + t))
        tasks.append(TaskData(f"perm{t}", _permute(data.train, perm), _permute(data.test, perm), data.train.num_classes))
    return tasks


@SCENARIOS.register("rotated")
def rotated(data: DataSplits, num_tasks: int = 5, degrees_per_task: float = 0.0) -> List[TaskData]:
    """Task t rotates every image by t * step degrees (step = 360 / num_tasks unless ``degrees_per_task`` is set)."""
    step = degrees_per_task or 360.0 / num_tasks
    tr, te = data.train, data.test
    if tr.x.dim() != 4:
        raise ConfigError(f"rotated: needs images [N, C, H, W]; the data are feature vectors of shape {list(tr.x.shape[1:])}")
    return [
        TaskData(f"rot{int(round(t * step))}", ArrayDataset(rotate(tr.x, t * step), tr.y, tr.classes),
                 ArrayDataset(rotate(te.x, t * step), te.y, te.classes), tr.num_classes)
        for t in range(num_tasks)
    ]


@SCENARIOS.register("split")
def split(data: DataSplits, num_tasks: int = 5, class_order_seed: Optional[int] = None) -> List[TaskData]:
    """Consecutive class groups ({0,1}, {2,3}, ...), each relabelled 0..k-1 (task-incremental). With
    ``class_order_seed`` the classes are shuffled first: task i gets ``perm[k*i : k*(i+1)]`` of
    ``numpy.random.RandomState(seed).permutation(n)``, labelled by position (SupSup's RandSplitCIFAR100 order)."""
    n = data.train.num_classes
    if n % num_tasks:
        raise ConfigError(f"split: {n} classes do not divide into {num_tasks} tasks")
    tasks = split_classes(n, num_tasks)
    if class_order_seed is not None:
        order, k = np.random.RandomState(class_order_seed).permutation(n).tolist(), n // num_tasks
        tasks = class_partition([order[k * i: k * (i + 1)] for i in range(num_tasks)], n)
    return [TaskData(t.name, t.select(data.train), t.select(data.test), t.num_classes, t.classes) for t in tasks]


def build_scenario(name: str, data: DataSplits, **kwargs) -> List[TaskData]:
    tasks = SCENARIOS.create(name, data=data, **kwargs)
    if not tasks:
        raise ConfigError(f"scenario {name!r} produced no tasks")
    return tasks
