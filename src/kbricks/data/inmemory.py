"""Data handed over in Python: tensors, numpy arrays, any ``torch.utils.data.Dataset``, an ``ArrayDataset`` or a
``DataSplits``, turned into the engine's ``DataSplits`` and named in a run config as
``data: {name: in_memory, kwargs: {ref: memory:data-1}}``.

Values are taken as they are: nothing is rescaled. Inputs must be images [N, C, H, W] or feature vectors [N, D]
(channels-last [N, H, W, C] images are converted, with a warning: :func:`kbricks.data.base.to_nchw`); labels integer
class ids 0..K-1.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.io import first_line
from ..errors import DataError
from ..registry import OBJECTS
from .base import ArrayDataset, DataSplits, stratified_split, to_nchw
from .registry import DATASETS


def as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except Exception as exc:
        raise DataError(f"{what}: cannot make a tensor of a {type(value).__name__} ({first_line(exc)})") from None


def dataset_arrays(ds: Any, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every (input, label) pair of a map-style dataset, stacked: ([N, ...], [N])."""
    if isinstance(ds, ArrayDataset):
        return ds.x, ds.y
    tensors = getattr(ds, "tensors", None)  # TensorDataset
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        return as_tensor(tensors[0], what), as_tensor(tensors[1], what)
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"{what}: a {type(ds).__name__} has no len(); give a map-style Dataset or (x, y) arrays") from None
    xs: List[torch.Tensor] = []
    ys: List[torch.Tensor] = []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{what}: item {i} is a {type(item).__name__}; each item must be an (input, label) pair")
        x, y = item[0], item[1]
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise DataError(f"{what}: item {i} has an input of type {type(x).__name__}; inputs must be tensors or arrays "
                            "(give the dataset a transform such as torchvision's ToTensor)")
        xs.append(as_tensor(x, what))
        ys.append(as_tensor(y, what).reshape(()))
    if not xs:
        raise DataError(f"{what}: the dataset is empty")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"{what}: items have different input shapes {sorted(shapes)[:3]}; resize them to one shape")
    return torch.stack(xs), torch.stack(ys)


def labels_of(y: torch.Tensor, what: str) -> torch.Tensor:
    if y.dim() != 1:
        raise DataError(f"{what}: labels must have shape [N], got {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise DataError(f"{what}: labels must be integer class ids, got non-integer values")
    if y.numel() and y.min() < 0:
        raise DataError(f"{what}: labels must be class ids 0..K-1, got {int(y.min())}")
    return y.long()


def as_arrays(data: Any, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors / arrays, or from a dataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        x, y = as_tensor(data[0], f"{what} inputs"), as_tensor(data[1], f"{what} labels")
    elif hasattr(data, "__getitem__") and not isinstance(data, (str, bytes, dict)):
        x, y = dataset_arrays(data, what)
    else:
        raise DataError(f"{what}: expected (x, y) tensors or arrays, or a torch Dataset; got {type(data).__name__}")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels")
    x, _ = to_nchw(x, f"{what} inputs")  # the npz loader's rule: [N, 28, 28, 1] is never read as 28-channel images
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)):
        raise DataError(f"{what}: inputs must be numbers, got {x.dtype}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"{what}: inputs hold NaN or infinite values")
    return x.float(), labels_of(y, what)


def python_splits(train: Any, test: Any = None, classes: Optional[Sequence[str]] = None, test_fraction: float = 0.2,
                  split_seed: int = 0, name: str = "in_memory") -> DataSplits:
    """A ``DataSplits`` from data given in Python. Without ``test``, a seeded stratified split holds out
    ``test_fraction`` of ``train`` (the same split for the same ``split_seed``)."""
    if isinstance(train, DataSplits):
        if test is not None:
            raise DataError("give either a DataSplits or separate train / test data, not both")
        return train
    x, y = as_arrays(train, "training data")
    if test is not None:
        xt, yt = as_arrays(test, "test data")
        if tuple(xt.shape[1:]) != tuple(x.shape[1:]):
            raise DataError(f"test inputs have shape {list(xt.shape[1:])} per sample but training inputs have {list(x.shape[1:])}")
    else:
        tr, te = stratified_split(y.numpy(), test_fraction, split_seed)
        x, y, xt, yt = x[torch.from_numpy(tr)], y[torch.from_numpy(tr)], x[torch.from_numpy(te)], y[torch.from_numpy(te)]
    k = int(max(int(y.max()), int(yt.max()) if len(yt) else 0)) + 1
    names = [str(i) for i in range(k)] if classes is None else [str(c) for c in classes]
    if len(names) < k:
        raise DataError(f"{len(names)} class names given but the labels go up to {k - 1}")
    info = {"split_seed": split_seed, "test_fraction": test_fraction} if test is None else {}
    return DataSplits(ArrayDataset(x, y, names), ArrayDataset(xt, yt, names), name=name, info=info)


@DATASETS.register("in_memory")
def in_memory(ref: str) -> DataSplits:
    """Data handed to the Python API (``ref`` is the key it was stored under)."""
    splits = OBJECTS.get(ref, "data.kwargs.ref")
    if not isinstance(splits, DataSplits):
        raise DataError(f"data.kwargs.ref {ref!r} holds a {type(splits).__name__}, not a DataSplits")
    return DataSplits(splits.train, splits.test, splits.name, dict(splits.info))  # a copy: runs may replace .train
