"""In-memory tensor datasets and seeded splits.

Small datasets live as one float tensor in [0, 1] with shape [N, C, H, W]; batches are index slices,
so there is no DataLoader worker overhead on small CPUs and no hidden copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError


@dataclass
class ArrayDataset:
    """Images ``x`` [N, C, H, W] float32 in [0, 1], labels ``y`` [N] int64, optional ``latents`` [N, K]."""

    x: torch.Tensor
    y: torch.Tensor
    classes: List[str]
    latents: Optional[torch.Tensor] = None
    latent_names: List[str] = field(default_factory=list)
    latent_sizes: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise DataError(f"images must have shape [N, C, H, W], got {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise DataError(
                f"labels must have shape [N] with N={self.x.shape[0]}, got {tuple(self.y.shape)}"
            )
        if self.latents is not None and self.latents.shape[0] != self.x.shape[0]:
            raise DataError("latents must have one row per image")
        if self.y.is_floating_point() and not torch.equal(self.y, self.y.round()):  # .long() would truncate silently
            raise DataError(f"labels must be integer class indices, got non-integer values such as {self.y[self.y != self.y.round()][0].item()}")
        self.x = self.x.float()
        self.y = self.y.long()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, idx):  # torch-style indexing for interop with DataLoader
        return self.x[idx], self.y[idx]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def subset(self, index: torch.Tensor) -> "ArrayDataset":
        return ArrayDataset(
            x=self.x[index],
            y=self.y[index],
            classes=self.classes,
            latents=None if self.latents is None else self.latents[index],
            latent_names=self.latent_names,
            latent_sizes=self.latent_sizes,
        )


@dataclass
class DataSplits:
    train: ArrayDataset
    test: ArrayDataset
    name: str
    info: Dict[str, object] = field(default_factory=dict)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple:
    """Seeded split keeping class proportions; returns (train_idx, test_idx), each sorted-shuffled."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = np.concatenate(train)
    test_idx = np.concatenate(test)
    # shuffle so the sets are not ordered by class (mnist5k ships sorted by class)
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    return train_idx, test_idx


def splits_from_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    test_fraction: float,
    split_seed: int,
    **info: object,
) -> DataSplits:
    train_idx, test_idx = stratified_split(y, test_fraction, split_seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    full = ArrayDataset(xt, yt, list(classes))
    return DataSplits(
        train=full.subset(torch.from_numpy(train_idx)),
        test=full.subset(torch.from_numpy(test_idx)),
        name=name,
        info={"split_seed": split_seed, "test_fraction": test_fraction, **info},
    )


def to_float_images(arr: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    """uint8 (or float) images -> float32 [N, C, H, W] in [0, 1]; accepts NHW, NHWC or NCHW."""
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and layout == "NHWC":
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim != 4:
        raise DataError(f"expected images with 3 or 4 dims, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if a.size and a.max() > 1.0:
        a = a / 255.0
    return a
