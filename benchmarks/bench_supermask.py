"""Evaluation cost of a task's forward pass with a combined supermask vs a plain dense network.

* dense: the same layer shapes as ordinary weights (F.linear / F.conv2d);
* combined, cached: W * sum_i alpha_i M_i computed once per task (what kbricks does at eval), then dense forwards;
* combined, per batch: the combination recomputed in every forward (what caching avoids);
* loop over impressions: k masked forwards per batch, summed (the naive alternative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import report, time_interleaved

from kbricks.models.masked import MaskedConvNet, MaskedMLP


def with_impressions(net, k: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(k):
        for layer in net.masked_layers():
            layer.store_mask(torch.rand(layer.weight.shape, generator=g) < 0.5)
    return [torch.full((k,), 1.0 / k) for _ in net.masked_layers()]


def bench_mlp(k: int = 5, batch: int = 1000):
    net = MaskedMLP(784, 10, (300, 100), density=0.5).eval()
    alphas = with_impressions(net, k)
    x = torch.randn(batch, 784)
    dense_w = [layer.weight.clone() for layer in net.masked_layers()]

    def dense():
        h = x
        for i, w in enumerate(dense_w):
            h = F.linear(h, w)
            h = F.relu(h) if i < len(dense_w) - 1 else h

    def cached():
        net(x)

    def per_batch():
        net.use_alpha(alphas)
        net(x)

    def loop():
        out = 0
        for i in range(k):
            one_hot = [F.one_hot(torch.tensor(i), k).float()] * len(alphas)
            net.use_cached(one_hot)
            out = out + net(x) * (1.0 / k)
        return out

    net.use_cached(alphas)
    with torch.no_grad():
        fns = {"dense forward": dense, "combined mask, cached (kbricks)": cached}
        t = time_interleaved(fns)
        t.update(time_interleaved({"combined mask, recomputed per batch": per_batch, f"loop over {k} impressions": loop}, repeats=3))
    net.release()
    return report(f"supermask eval forward, MLP 784-300-100-10, batch {batch}, k={k}", t, "dense forward")


def bench_conv(k: int = 5, batch: int = 256):
    net = MaskedConvNet(3, 10, 32, (32, 64), density=0.5).eval()
    alphas = with_impressions(net, k)
    x = torch.randn(batch, 3, 32, 32)
    weights = [layer.weight.clone() for layer in net.convs] + [net.out.weight.clone()]

    def dense():
        h = x
        for w in weights[:-1]:
            h = F.max_pool2d(F.relu(F.batch_norm(F.conv2d(h, w, padding=1), None, None, training=True)), 2)
        F.linear(h.mean((2, 3)), weights[-1])

    def cached():
        net(x)

    net.use_cached(alphas)
    with torch.no_grad():
        t = time_interleaved({"dense forward": dense, "combined mask, cached (kbricks)": cached})
    net.release()
    return report(f"supermask eval forward, conv 32-64 on 32x32, batch {batch}, k={k}", t, "dense forward")


def main():
    return {"mlp": bench_mlp(), "conv": bench_conv()}


if __name__ == "__main__":
    main()
