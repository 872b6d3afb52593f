"""Tasks over a dataset: class partitions (digits {0-4}, {5-9}) or one latent factor per task (dSprites).

Every method uses the same abstraction: ``task.select(ds)`` gives the samples that belong to a task and
``task.targets(ds)`` their labels in the task's own label space (0 .. num_classes-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..errors import DataError
from .base import ArrayDataset


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    classes: Optional[tuple] = None  # class-partition task: the global class ids it covers, in order
    latent: Optional[int] = None  # latent task: column of ``ds.latents``

    @property
    def kind(self) -> str:
        return "classes" if self.classes is not None else "latent"

    def member_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Which samples (by global label) belong to this task."""
        if self.classes is None:
            return torch.ones_like(y, dtype=torch.bool)
        return torch.isin(y, torch.tensor(self.classes, dtype=y.dtype))

    def local_labels(self, y: torch.Tensor, latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Global labels (or latents) -> labels in this task's space. Non-members map to -1."""
        if self.classes is None:
            if latents is None:
                raise DataError(f"task {self.name!r} reads latent {self.latent} but the data has no latents")
            return latents[:, self.latent]
        lut = torch.full((int(max(self.classes)) + 1 if len(self.classes) else 1,), -1, dtype=torch.long)
        lut[list(self.classes)] = torch.arange(len(self.classes))
        out = torch.full_like(y, -1)
        inside = y < lut.numel()
        out[inside] = lut[y[inside]]
        return out

    def select(self, ds: ArrayDataset) -> ArrayDataset:
        """The task's samples, with ``y`` relabelled into the task's label space."""
        keep = self.member_mask(ds.y).nonzero().squeeze(1)
        sub = ds.subset(keep)
        names = [ds.classes[c] for c in self.classes] if self.classes is not None else [
            str(i) for i in range(self.num_classes)
        ]
        return ArrayDataset(
            x=sub.x,
            y=self.local_labels(sub.y, sub.latents),
            classes=names,
            latents=sub.latents,
            latent_names=sub.latent_names,
            latent_sizes=sub.latent_sizes,
        )

    def to_dict(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "classes": list(self.classes) if self.classes is not None else None, "latent": self.latent}


def class_partition(partition: Sequence[Sequence[int]], num_classes: int) -> List[Task]:
    seen: set = set()
    tasks = []
    for i, part in enumerate(partition):
        part = [int(c) for c in part]
        if not part:
            raise DataError(f"task {i} of the class partition is empty")
        bad = [c for c in part if not 0 <= c < num_classes]
        if bad:
            raise DataError(f"task {i} has class ids {bad} outside 0..{num_classes - 1}")
        dup = seen.intersection(part)
        if dup:
            raise DataError(f"classes {sorted(dup)} appear in more than one task")
        seen.update(part)
        tasks.append(Task(name="classes_" + "-".join(map(str, part)), num_classes=len(part), classes=tuple(part)))
    return tasks


def split_classes(num_classes: int, num_tasks: int) -> List[Task]:
    """``num_tasks`` consecutive, near-equal class groups (10 classes, 2 tasks -> {0-4}, {5-9})."""
    if not 1 <= num_tasks <= num_classes:
        raise DataError(f"cannot split {num_classes} classes into {num_tasks} tasks")
    bounds = torch.linspace(0, num_classes, num_tasks + 1).round().long().tolist()
    return class_partition([list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])], num_classes)


def latent_tasks(ds: ArrayDataset, names: Sequence[str]) -> List[Task]:
    if ds.latents is None:
        raise DataError("latent tasks need a dataset with latent factors (e.g. dsprites)")
    tasks = []
    for n in names:
        if n not in ds.latent_names:
            raise DataError(f"unknown latent {n!r}; this dataset has {ds.latent_names}")
        i = ds.latent_names.index(n)
        tasks.append(Task(name=n, num_classes=ds.latent_sizes[i], latent=i))
    return tasks


def build_tasks(spec, ds: ArrayDataset) -> List[Task]:
    """From a ``TasksConfig``-like object (fields split / partition / latents) or None (one task, all classes)."""
    if spec is None:
        return [Task(name="all", num_classes=ds.num_classes, classes=tuple(range(ds.num_classes)))]
    if spec.split is not None:
        return split_classes(ds.num_classes, spec.split)
    if spec.partition is not None:
        return class_partition(spec.partition, ds.num_classes)
    return latent_tasks(ds, spec.latents)
