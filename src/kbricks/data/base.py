"""In-memory tensor datasets and seeded splits.

Small datasets live as one float tensor: images [N, C, H, W] (any H and W) or feature vectors [N, D]; batches are
index slices, so there is no DataLoader worker overhead on small CPUs and no hidden copies. Loaders put images in
[0, 1]; they never rescale anything silently (a value range they cannot read is an error that asks for a scale).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import DataError


@dataclass
class ArrayDataset:
    """Inputs ``x``: images [N, C, H, W] (float32, [0, 1] from the built-in loaders) or feature vectors [N, D];
    labels ``y`` [N] int64; optional ``latents`` [N, K].

    Models are built from the data's shape: ``in_channels`` (C, or D for feature vectors) and ``image_size`` (H for
    square images, ``(H, W)`` otherwise, ``None`` for feature vectors)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: List[str]
    latents: Optional[torch.Tensor] = None
    latent_names: List[str] = field(default_factory=list)
    latent_sizes: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x.dim() not in (2, 4):
            raise DataError(f"inputs must be images [N, C, H, W] or feature vectors [N, D], got shape {tuple(self.x.shape)} "
                            "(add a channel axis to [N, H, W] images; flatten other inputs)")
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
    def input_shape(self) -> Tuple[int, ...]:
        """One sample's shape: (C, H, W) or (D,)."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> Union[int, Tuple[int, int], None]:
        """H for square images, (H, W) for others, None for feature vectors."""
        return image_size_of(self.input_shape)

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


def image_size_of(input_shape: Sequence[int]) -> Union[int, Tuple[int, int], None]:
    """A model's ``image_size`` argument for one sample's shape: H (square), (H, W), or None (feature vector)."""
    if len(input_shape) == 1:
        return None
    h, w = int(input_shape[-2]), int(input_shape[-1])
    return h if h == w else (h, w)


def input_shape_of(in_channels: int, image_size: Union[int, Sequence[int], None]) -> Tuple[int, ...]:
    """The inverse of (``in_channels``, ``image_size``): (C, H, W), or (D,) when ``image_size`` is None."""
    if image_size is None:
        return (int(in_channels),)
    if isinstance(image_size, int):
        return (int(in_channels), image_size, image_size)
    h, w = image_size
    return (int(in_channels), int(h), int(w))


CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA: what a channel axis of an image array holds


def to_nchw(array, where: str, layout: str = "auto"):
    """Images as [N, C, H, W], whatever layout they came in; returns ``(array, converted)``. Works on numpy arrays
    and torch tensors; arrays that are not 4-D come back unchanged.

    ``layout="auto"``: an array whose last axis has 1, 3 or 4 entries while its second does not is channels-last
    [N, H, W, C]: it is converted, with a warning saying so (never read as C=H images). When both axes could hold
    the channels, square images under one reading only decide it ([N, 1, 4, 4] is NCHW); otherwise (e.g.
    [N, 3, 8, 3], [N, 3, 3, 3]) the layout is not guessed: a one-line :class:`DataError` asks for it.
    ``"NCHW"`` / ``"NHWC"`` state it."""
    if layout not in ("auto", "NCHW", "NHWC"):
        raise DataError(f"{where}: layout must be auto, NCHW or NHWC, got {layout!r}")
    if getattr(array, "ndim", None) != 4:
        return array, False
    shape = tuple(int(s) for s in array.shape)
    if layout == "auto":
        last, second = shape[-1] in CHANNEL_COUNTS, shape[1] in CHANNEL_COUNTS
        if last and second and shape[2] == shape[3] and shape[1] != shape[2]:
            last = False  # [N, 1, 4, 4]: square 4x4 images as NCHW, 1x4 ones as NHWC; the square reading wins
        if last and second:
            raise DataError(f"{where}: images of shape {list(shape)} could be [N, C, H, W] or [N, H, W, C]; say which "
                            "(layout: NCHW or NHWC; in Python, pass x.permute(0, 3, 1, 2) for channels-last arrays)")
        if not last:
            return array, False
        warnings.warn(f"{where}: images of shape {list(shape)} are channels-last [N, H, W, C]; converted to "
                      f"[N, C, H, W] = {[shape[0], shape[3], shape[1], shape[2]]}", UserWarning, stacklevel=2)
    elif layout == "NCHW":
        return array, False
    if isinstance(array, torch.Tensor):
        return array.permute(0, 3, 1, 2).contiguous(), True
    return np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)), True


def _non_finite(a: np.ndarray, what: str) -> None:
    """NaN or inf among float values: named as such (a min/max over them would suggest a nonsensical scale)."""
    if a.dtype.kind not in "fc" or not a.size:
        return
    finite = np.isfinite(a)
    if finite.all():
        return
    bad = np.flatnonzero(~finite.reshape(len(a), -1).all(1)) if a.ndim > 1 else np.flatnonzero(~finite)
    kinds = " and ".join(k for k, hit in (("NaN", np.isnan(a).any()), ("infinite", np.isinf(a).any())) if hit)
    raise DataError(f"{what}: the array holds {kinds} values ({int((~finite).sum())} of {a.size}, in {len(bad)} sample(s), "
                    f"first at index {int(bad[0])}); remove or repair those samples (kbricks never fills them in)")


def scaled(a: np.ndarray, scale: Optional[float], what: str) -> np.ndarray:
    """float32 values: uint8 divided by 255, anything divided by ``scale`` when given; otherwise values must already
    lie in [0, 1], and anything else is an error that names the range found (never a silent guess)."""
    _non_finite(a, what)
    if scale is not None:
        if not scale > 0 or not np.isfinite(scale):
            raise DataError(f"{what}: scale must be a finite positive number (values are divided by it), got {scale}")
        return a.astype(np.float32) / np.float32(scale)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0 or not np.isfinite([lo, hi]).all():
        raise DataError(f"{what}: {a.dtype} values span [{lo:g}, {hi:g}], outside [0, 1]; say how to read them with "
                        f"scale (values are divided by it, e.g. scale={hi:g} for a 0..{hi:g} scale, or scale=1 to keep them as they are)")
    return a.astype(np.float32)


def to_float_images(arr: np.ndarray, layout: str = "NCHW", scale: Optional[float] = None, what: str = "images") -> np.ndarray:
    """Images -> float32 [N, C, H, W]; accepts NHW, NHWC or NCHW. uint8 is divided by 255, other types by ``scale``
    (required unless the values already lie in [0, 1])."""
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        a, _ = to_nchw(a, what, layout)
    else:
        raise DataError(f"{what}: expected images with 3 or 4 dims, got shape {a.shape}")
    return scaled(a, scale, what)


def to_float_inputs(arr: np.ndarray, layout: str = "NCHW", scale: Optional[float] = None, what: str = "inputs") -> np.ndarray:
    """Like :func:`to_float_images`, and feature vectors [N, D] stay [N, D]."""
    a = np.asarray(arr)
    if a.ndim == 2:
        return scaled(a, scale, what)
    return to_float_images(a, layout, scale, what)
