"""Checks every dataset passes before a model is built, whatever loaded it (embedded, on-disk formats, a user's
own registered dataset): non-empty splits, integer labels in range, classes that are all used (contiguous
0..K-1), one image shape, finite pixels. Each failure is one :class:`DataError` line naming the split and the
problem, so a label of 1,000,000 or a NaN test set never becomes a silently useless run.
"""

from __future__ import annotations

from typing import List

import torch

from ..errors import DataError
from .base import ArrayDataset, DataSplits


def _ranges(values: List[int], limit: int = 4) -> str:
    """Sorted ``[3, 4, 5, 9]`` -> ``"3..5, 9"`` (the first ``limit`` runs)."""
    runs: List[str] = []
    start = None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            runs.append(f"{start}" if start == v else f"{start}..{v}")
            start = None
            if len(runs) > limit:
                break
    return ", ".join(runs[:limit]) + (" ..." if len(runs) > limit else "")


def _gaps(present: List[int], k: int, limit: int = 4) -> str:
    """The classes of 0..k-1 absent from sorted ``present``, as ranges, without listing them one by one (k may be
    huge when a stray label sets it)."""
    runs, expected = [], 0
    for v in present + [k]:
        if v > expected:
            runs.append(f"{expected}" if v - 1 == expected else f"{expected}..{v - 1}")
            if len(runs) > limit:
                break
        expected = v + 1
    return ", ".join(runs[:limit]) + (" ..." if len(runs) > limit else "")


def _check_split(name: str, split: str, ds: ArrayDataset) -> None:
    where = f"dataset {name!r}, {split} split"
    if len(ds) == 0:
        raise DataError(f"{where} is empty (0 samples)")
    y = ds.y
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{where}: labels must be integer class indices, got dtype {y.dtype}")
    k = ds.num_classes
    if k == 0:
        raise DataError(f"{where}: the dataset declares no classes")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: label {bad} is out of range for its {k} classes (labels must be 0..{k - 1})")
    finite = torch.isfinite(ds.x.flatten(1)).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise DataError(f"{where}: {len(bad)} of {len(ds)} images hold NaN or inf values (first at index {int(bad[0])})")
    if ds.latents is not None and ds.latent_sizes:
        for j, (lname, size) in enumerate(zip(ds.latent_names or [str(j) for j in range(len(ds.latent_sizes))], ds.latent_sizes)):
            col = ds.latents[:, j]
            if len(col) and (int(col.min()) < 0 or int(col.max()) >= size):
                raise DataError(f"{where}: latent {lname!r} has values outside 0..{size - 1}")


def validate_splits(splits: DataSplits) -> DataSplits:
    """Refuse data that would train a meaningless model; returns ``splits`` unchanged."""
    name = splits.name
    for split, ds in (("train", splits.train), ("test", splits.test)):
        _check_split(name, split, ds)
    tr, te = splits.train, splits.test
    if list(tr.classes) != list(te.classes):
        raise DataError(f"dataset {name!r}: the train and test splits declare different classes "
                        f"({len(tr.classes)} vs {len(te.classes)} names)")
    if tuple(tr.x.shape[1:]) != tuple(te.x.shape[1:]):
        raise DataError(f"dataset {name!r}: train images are {tuple(tr.x.shape[1:])} but test images are {tuple(te.x.shape[1:])}")
    k = tr.num_classes
    present = torch.unique(torch.cat([tr.y, te.y]))
    if len(present) < k:
        raise DataError(
            f"dataset {name!r}: {k - len(present)} of its {k} classes have no samples (classes {_gaps(present.tolist(), k)}); the labels "
            f"must use every class 0..{k - 1}: relabel them, or set data.relabel: true to map the {len(present)} labels "
            f"present ({_ranges(present.tolist())}) to 0..{len(present) - 1}")
    return splits


def relabel_splits(splits: DataSplits) -> DataSplits:
    """``data.relabel: true``: map the distinct labels present in train and test (sorted) to 0..K-1. The class
    names follow their labels (a label beyond the declared names is named by its number)."""
    for split, ds in (("train", splits.train), ("test", splits.test)):
        if len(ds) and ds.y.min() < 0:
            raise DataError(f"dataset {splits.name!r}, {split} split: negative label {int(ds.y.min())} (data.relabel maps class "
                            "indices >= 0 only)")
    present = torch.unique(torch.cat([splits.train.y, splits.test.y]))
    old = splits.train.classes
    classes = [old[i] if i < len(old) else str(i) for i in present.tolist()]

    def remap(ds: ArrayDataset) -> ArrayDataset:
        return ArrayDataset(ds.x, torch.searchsorted(present, ds.y), classes, ds.latents, ds.latent_names, ds.latent_sizes)

    splits.train, splits.test = remap(splits.train), remap(splits.test)
    splits.info = dict(splits.info, relabel={int(v): i for i, v in enumerate(present.tolist())})
    return splits
