"""Supermask costs, measured side by side in one process.

1. A task's forward pass with a combined supermask vs a plain dense network:
   * dense: the same layer shapes as ordinary weights (F.linear / F.conv2d);
   * combined, cached: sum_i alpha_i M_i computed once per task (what kbricks does at eval), then masked forwards;
   * combined, per batch: the combination recomputed in every forward (what caching avoids);
   * loop over impressions: k masked forwards per batch, summed (the naive alternative).
2. How the cost grows with the number of stored masks T = 5, 50, 250, 1000 (issue 16), as ratios to T = 5:
   * known-task evaluation (SupSup ``predict_task``: the task's own packed mask is unpacked, nothing else is read);
   * one-shot task inference over all T masks (one forward/backward, one dot product per stored mask); banks whose
     float view would exceed ``MaskBank.float_cache_bytes`` (512 MiB per layer: T = 1000 here) are read packed,
     through per-byte lookup tables, and are also timed with the float view kept;
   * storing a mask (packed, capacity doubling): the median store while T masks are stored.
   The masks are random here (timing only); the accuracy of one-shot inference over 250 trained masks is the
   ``kbricks study cl --scenario scale`` result, printed next to it when results/runs/cl/scale/study.json exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import report, time_interleaved

from kbricks.continual.inference import superposition_gradient
from kbricks.continual.supsup import SupSup
from kbricks.models import create_model
from kbricks.models.masked import CachedWeights, Combination, MaskBank, StoredMask
from kbricks.models.supermask import supermask

TASK_COUNTS = (5, 50, 250, 1000)


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


# ---- growth with the number of stored masks ------------------------------------------------------------------


def strategy_with(num_masks: int) -> SupSup:
    """A SupSup strategy on the 784-300-100-10 MLP holding ``num_masks`` random packed masks (no data needed)."""
    s = SupSup.__new__(SupSup)
    torch.nn.Module.__init__(s)
    s.net = supermask(create_model("masked_mlp", num_classes=10, in_channels=1, image_size=28), 0.5, seed=0)
    s.task_classes = [10] * num_masks
    s.params = SupSup.Config()
    g = torch.Generator().manual_seed(num_masks)
    for _ in range(num_masks):
        s.net.store([torch.rand(layer.weight.shape, generator=g) < 0.5 for layer in s.net.masked_layers()])
    return s.eval()


def bench_growth(counts=TASK_COUNTS):
    strategies = {T: strategy_with(T) for T in counts}
    x16, x1000 = torch.randn(16, 1, 28, 28), torch.randn(1000, 1, 28, 28)
    out = {}
    with torch.no_grad():
        for n, x in (("16", x16), ("1000", x1000)):
            fns = {f"T={T}": (lambda s=s, T=T, x=x: s.predict_task(x, T // 2)) for T, s in strategies.items()}
            out[f"known-task evaluation ({n} images) vs stored masks T"] = report(
                f"SupSup known-task evaluation, {n} images, T stored masks", time_interleaved(fns), f"T={counts[0]}")
    fns = {f"T={T}": (lambda s=s, T=T: superposition_gradient(s, x16, list(range(T)))) for T, s in strategies.items()}
    big = max(counts)
    if big * 4 * 300 * 784 > MaskBank.float_cache_bytes:  # the largest bank is read packed; also time it with a float view
        cached = strategy_with(big)
        for layer in cached.net.masked_layers():
            layer.bank.float_cache_bytes = 4 * 2**30
        fns[f"T={big}, float view kept (float_cache_bytes raised)"] = lambda: superposition_gradient(cached, x16, list(range(big)))
    for s in [*strategies.values(), *([cached] if big * 4 * 300 * 784 > MaskBank.float_cache_bytes else [])]:
        superposition_gradient(s, x16, list(range(s.net.num_stored())))  # the float view is built once, then reused
    block = report("one-shot task inference (16 images) over T stored masks", time_interleaved(fns, repeats=5, inner=3), f"T={counts[0]}")
    for T, s in strategies.items():
        layers = s.net.masked_layers()
        block[f"T={T}/packed MiB"] = sum(int(la.bank.packed().numel()) for la in layers) / 2**20
        block[f"T={T}/float view MiB"] = sum(4 * la.bank.numel * la.bank._float.shape[0] for la in layers if la.bank._float is not None) / 2**20
    scale = Path("results/runs/cl/scale/study.json")
    if scale.exists():
        r = json.loads(scale.read_text())["runs"][0]
        block["trained 250-task run/one-shot task id 16img"] = r.get("task_inference/one_shot/16img")
        block["trained 250-task run/one-shot task id 1img"] = r.get("task_inference/one_shot/1img")
        print(f"  (trained {r['num_tasks']}-task run, results/runs/cl/scale: one-shot task id {100 * r['task_inference/one_shot/1img']:.1f}% "
              f"from 1 image, {100 * r['task_inference/one_shot/16img']:.1f}% from 16)")
    out["one-shot inference (16 images) vs stored masks T"] = block
    block = report("store one mask (median over the T stores)", store_times(counts), f"T={counts[0]}")
    out["storing a mask vs stored masks T"] = {**block, **store_times.means}
    return out


def store_times(counts):
    """Median seconds of one store while T masks are stored one after another into an empty bank (packing, and the
    capacity doubling whenever it is full); the same few masks are cycled for every T, so every T reads the same
    (cache-warm) inputs. The median is robust to other processes on the machine; the growth steps are included in
    the mean, reported as ``<T>/mean ms``."""
    import statistics

    net = supermask(create_model("masked_mlp", num_classes=10, in_channels=1, image_size=28), 0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    pool = [[torch.rand(layer.weight.shape, generator=g) < 0.5 for layer in net.masked_layers()] for _ in range(min(counts))]
    out, means = {}, {}
    for T in counts:
        fresh = supermask(create_model("masked_mlp", num_classes=10, in_channels=1, image_size=28), 0.5, seed=0)
        times = []
        for i in range(T):
            t0 = time.perf_counter()
            fresh.store(pool[i % len(pool)])
            times.append(time.perf_counter() - t0)
        out[f"T={T}"], means[f"T={T}/mean ms"] = statistics.median(times), 1e3 * statistics.fmean(times)
    store_times.means = means
    return out


def main():
    return {"mlp": bench_mlp(), "conv": bench_conv(), **bench_growth()}


if __name__ == "__main__":
    main()
