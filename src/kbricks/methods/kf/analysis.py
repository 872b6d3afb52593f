"""Representation analysis: mutual information gap (MIG) against ground-truth factors, and linear probes."""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F


def _discretize(codes: np.ndarray, bins: int) -> np.ndarray:
    out = np.zeros_like(codes, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, d], bins=bins)
        out[:, d] = np.digitize(codes[:, d], edges[1:-1])
    return out


def discrete_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats for two integer arrays."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def entropy(a: np.ndarray) -> float:
    _, counts = np.unique(a, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_info_gap(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> Dict[str, float]:
    """MIG (Chen et al. 2018): for each factor, the gap between the two code dimensions most informative about it,
    normalised by the factor's entropy; averaged over factors. 1 = each factor in exactly one dimension."""
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.shape[1] < 2:
        raise ValueError("MIG needs at least 2 code dimensions")
    disc = _discretize(codes, bins)
    gaps = {}
    for k in range(factors.shape[1]):
        h = entropy(factors[:, k])
        if h == 0:
            continue
        mi = sorted((discrete_mutual_info(disc[:, d], factors[:, k]) for d in range(disc.shape[1])), reverse=True)
        gaps[k] = (mi[0] - mi[1]) / h
    return {"mig": float(np.mean(list(gaps.values()))), **{f"mig_factor{k}": v for k, v in gaps.items()}}


def pca_project(train: torch.Tensor, test: torch.Tensor, dim: int):
    """Project onto the top-``dim`` principal components of ``train`` (for equal-size code comparisons)."""
    mean = train.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(train - mean, q=min(dim, train.shape[1]), center=False)
    return (train - mean) @ v[:, :dim], (test - mean) @ v[:, :dim]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 weight_decay: float = 1e-4, steps: int = 100) -> float:
    """Multinomial logistic regression on frozen, standardised features (L-BFGS); returns test accuracy."""
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    g = torch.Generator().manual_seed(0)
    w = (0.01 * torch.randn(xtr.shape[1], n_cls, generator=g)).requires_grad_()
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((xte @ w + b).argmax(1) == test_y).float().mean().item()
