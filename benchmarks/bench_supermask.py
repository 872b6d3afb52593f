"""Evaluation cost of a task's forward pass with a combined supermask vs a plain dense network.

* dense: the same layer shapes as ordinary weights (F.linear / F.conv2d);
* combined, cached: sum_i alpha_i M_i computed once per task (what kbricks does at eval), then masked forwards;
* combined, per batch: the combination recomputed in every forward (what caching avoids);
* loop over impressions: k masked forwards per batch, summed (the naive alternative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import report, time_interleaved

from kbricks.models import create_model
from kbricks.models.masked import CachedWeights, Combination, StoredMask, supermask


def with_impressions(net, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    for _ in range(k):
        net.store([torch.rand(layer.weight.shape, generator=g) < 0.5 for layer in net.masked_layers()])
    return torch.full((len(net.masked_layers()), k), 1.0 / k)


def combined(net, alpha):
    return CachedWeights(net, Combination(alpha))


def bench_mlp(k: int = 5, batch: int = 1000):
    net = supermask(create_model("masked_mlp", num_classes=10, in_channels=1, image_size=28), 0.5).eval()
    alpha = with_impressions(net, k)
    x = torch.randn(batch, 1, 28, 28)
    dense_w = [layer.weight.clone() for layer in net.masked_layers()]
    cache = combined(net, alpha)

    def dense():
        h = x.flatten(1)
        for i, w in enumerate(dense_w):
            h = F.linear(h, w)
            h = F.relu(h) if i < len(dense_w) - 1 else h

    def cached():
        with net.using(cache):
            net(x)

    def per_batch():
        with net.using(Combination(alpha)):
            net(x)

    def loop():
        out = 0
        for i in range(k):
            with net.using(StoredMask(i)):
                out = out + net(x) * (1.0 / k)
        return out

    with torch.no_grad():
        fns = {"dense forward": dense, "combined mask, cached (kbricks)": cached, "combined mask, recomputed per batch": per_batch,
               f"loop over {k} impressions": loop}
        t = time_interleaved(fns)
    return report(f"supermask eval forward, MLP 784-300-100-10, batch {batch}, k={k}", t, "dense forward")


def bench_conv(k: int = 5, batch: int = 256):
    net = supermask(create_model("masked_convnet", num_classes=10, in_channels=3, image_size=32, widths=[32, 64]), 0.5).eval()
    alpha = with_impressions(net, k)
    x = torch.randn(batch, 3, 32, 32)
    weights = [layer.weight.clone() for layer in net.masked_layers()]
    cache = combined(net, alpha)

    def dense():
        h = x
        for w in weights[:-1]:
            h = F.max_pool2d(F.relu(F.batch_norm(F.conv2d(h, w, padding=1), None, None, training=True)), 2)
        F.linear(h.mean((2, 3)), weights[-1])

    def cached():
        with net.using(cache, task=0):
            net(x)

    with torch.no_grad():
        t = time_interleaved({"dense forward": dense, "combined mask, cached (kbricks)": cached})
    return report(f"supermask eval forward, conv 32-64 on 32x32, batch {batch}, k={k}", t, "dense forward")


def main():
    return {"mlp": bench_mlp(), "conv": bench_conv()}


if __name__ == "__main__":
    main()
