"""Procedural dSprites: 2D shapes rendered from five latent factors, nothing downloaded.

Factors (as in Matthey et al. 2017): shape (square, ellipse, heart), scale, orientation, posX, posY.
Each image is a binary ``image_size`` x ``image_size`` raster; the latent classes come with it, so every
factor can be a task and disentanglement metrics can be computed against ground truth.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import DataError
from .base import ArrayDataset, DataSplits, stratified_split
from .registry import DATASETS

SHAPES = ["square", "ellipse", "heart"]
LATENT_NAMES = ["shape", "scale", "orientation", "pos_x", "pos_y"]


def factor_values(num_scales: int, num_orientations: int, num_positions: int):
    return {
        "shape": np.arange(len(SHAPES), dtype=np.float32),
        "scale": np.linspace(0.5, 1.0, num_scales, dtype=np.float32),
        "orientation": np.linspace(0.0, 2 * math.pi, num_orientations, endpoint=False, dtype=np.float32),
        "pos_x": np.linspace(0.0, 1.0, num_positions, dtype=np.float32),
        "pos_y": np.linspace(0.0, 1.0, num_positions, dtype=np.float32),
    }


def render(latent_values: torch.Tensor, image_size: int = 64) -> torch.Tensor:
    """Render a batch of shapes. ``latent_values`` is [N, 5] = (shape id, scale, angle, x, y) -> [N, 1, S, S]."""
    n = latent_values.shape[0]
    shape, scale, angle, px, py = latent_values.float().unbind(1)
    radius = 0.16 * image_size * scale  # a full-scale shape spans about a third of the canvas
    margin = 0.2 * image_size
    cx = margin + px * (image_size - 1 - 2 * margin)
    cy = margin + py * (image_size - 1 - 2 * margin)
    coords = torch.arange(image_size, dtype=torch.float32)
    v, u = torch.meshgrid(coords, coords, indexing="ij")  # rows (y), cols (x)
    du = u[None] - cx.view(n, 1, 1)
    dv = v[None] - cy.view(n, 1, 1)
    cos, sin = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    # rotate pixel offsets into the shape's own frame, then normalise by its radius
    x = (cos * du + sin * dv) / radius.view(n, 1, 1)
    y = (-sin * du + cos * dv) / radius.view(n, 1, 1)
    square = torch.maximum(x.abs(), y.abs()) <= 0.8
    ellipse = x.pow(2) + (y / 0.5).pow(2) <= 1.0
    hx, hy = x * 1.15, -y * 1.15 + 0.15  # heart curve, flipped so the point faces down
    heart = (hx.pow(2) + hy.pow(2) - 1).pow(3) - hx.pow(2) * hy.pow(3) <= 0
    sid = shape.long().view(n, 1, 1)
    img = torch.where(sid == 0, square, torch.where(sid == 1, ellipse, heart))
    return img.float().unsqueeze(1)


def sample_latents(n: int, sizes, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, s, size=n) for s in sizes], axis=1)


@DATASETS.register("dsprites")
def dsprites(
    n_samples: int = 10000,
    image_size: int = 64,
    num_scales: int = 6,
    num_orientations: int = 40,
    num_positions: int = 32,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> DataSplits:
    """Sample ``n_samples`` latent combinations uniformly (seeded) and render them.

    ``y`` is the shape class; ``latents`` holds the class index of every factor (columns ``LATENT_NAMES``).
    """
    if n_samples < 10:
        raise DataError(f"dsprites n_samples must be >= 10, got {n_samples}")
    if image_size < 16:
        raise DataError(f"dsprites image_size must be >= 16, got {image_size}")
    values = factor_values(num_scales, num_orientations, num_positions)
    sizes = [len(values[k]) for k in LATENT_NAMES]
    classes = sample_latents(n_samples, sizes, split_seed)
    latent_values = np.stack([values[k][classes[:, i]] for i, k in enumerate(LATENT_NAMES)], axis=1)
    images = torch.cat(
        [render(torch.from_numpy(chunk), image_size) for chunk in np.array_split(latent_values, max(1, n_samples // 2048))]
    )
    full = ArrayDataset(
        x=images,
        y=torch.from_numpy(classes[:, 0].astype(np.int64)),
        classes=list(SHAPES),
        latents=torch.from_numpy(classes.astype(np.int64)),
        latent_names=list(LATENT_NAMES),
        latent_sizes=sizes,
    )
    train_idx, test_idx = stratified_split(classes[:, 0], test_fraction, split_seed)
    return DataSplits(
        full.subset(torch.from_numpy(train_idx)),
        full.subset(torch.from_numpy(test_idx)),
        name="dsprites",
        info={"latent_sizes": dict(zip(LATENT_NAMES, sizes)), "split_seed": split_seed},
    )


@DATASETS.register("shapes8")
def shapes8(n_samples: int = 6000, test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """dSprites shapes rendered at 32x32 then area-pooled to 8x8; label = shape x scale-half (6 classes).
    A foreign label space on the digits' 8x8 geometry: a 'Places-like' source for transfer to digits."""
    d = dsprites(n_samples=n_samples, image_size=32, num_scales=6, num_orientations=8, num_positions=8,
                 test_fraction=test_fraction, split_seed=split_seed)
    classes = [f"{s}-{size}" for s in SHAPES for size in ("small", "large")]

    def convert(ds: ArrayDataset) -> ArrayDataset:
        x = torch.nn.functional.adaptive_avg_pool2d(ds.x, 8)
        y = ds.latents[:, 0] * 2 + (ds.latents[:, 1] >= 3).long()
        return ArrayDataset(x, y, classes)

    return DataSplits(convert(d.train), convert(d.test), name="shapes8")
