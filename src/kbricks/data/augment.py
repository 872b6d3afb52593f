"""Tensor-level augmentations applied per batch (on the batch's device), seeded by a torch.Generator.

Crop and flip need images [N, C, H, W] (any H, W); normalisation works per channel of images and per feature of
feature vectors [N, D]."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import DataError


def random_crop(x: torch.Tensor, padding: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero-pad by ``padding`` then crop back to the original size at a random offset per sample."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # [n, h]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # [n, w]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def channel_view(values, like: torch.Tensor) -> torch.Tensor:
    """Per-channel (or per-feature) values shaped to broadcast over a batch like ``like``: [1, C, 1, 1] or [1, D]."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, *([1] * (like.dim() - 2)))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (x - channel_view(mean, x)) / channel_view(std, x)


class BatchAugment:
    """Train-time: crop + flip then normalize. Eval-time: normalize only."""

    def __init__(self, crop_padding: int = 0, hflip: bool = False, mean=None, std=None, input_shape: Optional[Tuple[int, ...]] = None):
        if input_shape is not None and len(input_shape) != 3 and (crop_padding or hflip):
            raise DataError(f"data.augment: crop_padding and hflip need images [N, C, H, W]; the inputs are feature vectors "
                            f"of shape {list(input_shape)} (set crop_padding: 0, hflip: false)")
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.mean = mean
        self.std = std

    def __call__(self, x: torch.Tensor, train: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if train:
            x = random_crop(x, self.crop_padding, generator)
            if self.hflip:
                x = random_hflip(x, generator)
        if self.mean is not None:
            x = normalize(x, self.mean, self.std)
        return x


def channel_stats(x: torch.Tensor) -> tuple:
    """Per-channel (images) or per-feature (feature vectors) mean and std of a dataset, for ``normalize: auto``.
    A constant channel gets std 1, so a value it never took in training stays finite after normalisation."""
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dim=dims)
    std = x.std(dim=dims)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.tolist(), std.tolist()
