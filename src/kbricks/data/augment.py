"""Tensor-level augmentations applied per batch (on the batch's device), seeded by a torch.Generator."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


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


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class BatchAugment:
    """Train-time: crop + flip then normalize. Eval-time: normalize only."""

    def __init__(self, crop_padding: int = 0, hflip: bool = False, mean=None, std=None):
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
    """Per-channel mean and std of a dataset, for ``normalize: auto``."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()
