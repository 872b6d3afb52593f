"""Supermask costs, measured side by side in one process.

1. A task's forward pass with a combined supermask vs a plain dense network:
   * dense: the same layer shapes as ordinary weights (F.linear / F.conv2d);
   * combined, cached: sum_i alpha_i M_i computed once per task (what kbricks does at eval), then masked forwards;
   * combined, per batch: the combination recomputed in every forward (what caching avoids);
   * loop over impressions: k masked forwards per batch, summed (the naive alternative).
2. How the cost grows with the number of stored masks T = 5, 50, 250, 1000 (issue 16), as ratios to T = 5:
   * known-task evaluation (SupSup ``predict_task``: the task's own packed mask is unpacked, nothing else is read);
   * one-shot task inference over all T masks (one forward/backward, one dot product per stored mask, read from the
     packed 1-bit masks a block at a time: no float copy of the masks is kept);
   * storing a mask (packed, capacity doubling): the median store while T masks are stored.
3. One-shot inference cold vs warm (issue 24): the first call on a freshly built strategy (T = 5, 250) against the
   median of the calls after it, per round; and the memory the strategy holds at T = 250: the bytes of every tensor
   reachable from the strategy object (parameters, buffers, packed masks and any cache, found by walking its object
   graph, so it does not depend on the store's internals) per stored mask weight, and the peak RSS growth of a
   fresh process that builds the strategy and runs one-shot inference (/proc/self/status).
   The masks are random here (timing only); the accuracy of one-shot inference over 250 trained masks is the
   ``kbricks study cl --scenario scale`` result, printed next to it when results/runs/cl/scale/study.json exists.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from common import clock, fmt_stat, quick, report, rounds, summary, time_rounds

from kbricks.continual.inference import infer_task
from kbricks.continual.supsup import SupSup
from kbricks.models import create_model
from kbricks.models.masked import CachedWeights, Combination, StoredMask
from kbricks.models.supermask import supermask

TASK_COUNTS = (5, 50, 250, 1000)  # BENCH_QUICK: (5, 20)


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
        t = time_rounds(fns, "dense forward")
    return report(f"supermask eval forward, MLP 784-300-100-10, batch {batch}, k={k}", t, "dense forward",
                  f"An eval forward of the MLP with a combination of {k} stored masks, against the same layers as plain F.linear on dense weights.")


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
        t = time_rounds({"dense forward": dense, "combined mask, cached (kbricks)": cached}, "dense forward")
    return report(f"supermask eval forward, conv 32-64 on 32x32, batch {batch}, k={k}", t, "dense forward",
                  f"An eval forward of the conv net with a cached combination of {k} stored masks, against plain F.conv2d on dense weights.")


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


def one_shot(s, x):
    return lambda: infer_task(s, x, "one_shot")


def bench_growth(counts):
    strategies = {T: strategy_with(T) for T in counts}
    x16, x1000 = torch.randn(16, 1, 28, 28), torch.randn(1000, 1, 28, 28)
    base, out = f"T={counts[0]}", {}
    with torch.no_grad():
        for n, x in (("16", x16), ("1000", x1000)):
            fns = {f"T={T}": (lambda s=s, T=T, x=x: s.predict_task(x, T // 2)) for T, s in strategies.items()}
            out[f"known-task evaluation ({n} images) vs stored masks T"] = report(
                f"SupSup known-task evaluation, {n} images, T stored masks", time_rounds(fns, base), base,
                f"Evaluating {n} images with one known task's mask while T masks are stored, against T = {counts[0]}.")
    fns = {f"T={T}": one_shot(s, x16) for T, s in strategies.items()}
    block = report("one-shot task inference (16 images) over T stored masks", time_rounds(fns, base, inner=2), base,
                   f"SupSup one-shot task inference (infer_task, warm) over T stored masks on 16 images, against T = {counts[0]}.")
    scale = Path("results/runs/cl/scale/study.json")
    if scale.exists():
        r = json.loads(scale.read_text())["runs"][0]
        block["trained 250-task run: one-shot task id, 16 images"] = r.get("task_inference/one_shot/16img")
        block["trained 250-task run: one-shot task id, 1 image"] = r.get("task_inference/one_shot/1img")
    out["one-shot inference (16 images) vs stored masks T"] = block
    out["storing a mask vs stored masks T"] = report("store one mask (median over the T stores)", store_times(counts), base,
                                                     f"Storing one more mask while T masks are stored, against T = {counts[0]}.")
    return out


def cold_warm(counts, warm_calls: int = 5) -> dict:
    """Per round and per T: a freshly built strategy's first one-shot inference (cold), then the median of the next
    ``warm_calls`` (warm); the ratio cold / warm is taken within the round."""
    now, x16 = clock(), torch.randn(16, 1, 28, 28)
    cold, warm = {T: [] for T in counts}, {T: [] for T in counts}
    for _ in range(rounds(5)):
        for T in counts:
            s = strategy_with(T)
            gc.collect()
            t0 = now()
            infer_task(s, x16, "one_shot")
            cold[T].append(now() - t0)
            times = []
            for _ in range(warm_calls):
                t0 = now()
                infer_task(s, x16, "one_shot")
                times.append(now() - t0)
            warm[T].append(statistics.median(times))
            del s
    res = {}
    for T in counts:
        res[f"T={T}, warm"] = {"ms": summary([1e3 * t for t in warm[T]]), "ratio": summary([1.0] * len(warm[T]))}
        res[f"T={T}, cold (first call, fresh strategy)"] = {"ms": summary([1e3 * t for t in cold[T]]),
                                                            "ratio": summary([c / w for c, w in zip(cold[T], warm[T])])}
    print("\n== one-shot inference, first call vs warm")
    for name, r in res.items():
        print(f"  {name:<44s} {fmt_stat(r['ms'])} ms   ratio to warm: {fmt_stat(r['ratio'], suffix='x')}")
    return {"title": "one-shot inference (16 images): first call on a fresh strategy vs warm calls",
            "compares": "SupSup one-shot task inference: the first call on a freshly built strategy against the median of the "
                        "calls after it (each ratio is to the warm call at the same T, within a round).",
            "baseline": "warm at the same T", "candidates": res}


def tensor_bytes(root) -> int:
    """Bytes of every distinct tensor storage reachable from ``root`` through attributes, containers and closures."""
    seen, storages, total, stack = set(), set(), 0, [root]
    skip = (type, types.ModuleType, str, bytes, int, float, bool, type(None))
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.device.type != "meta":
                st = o.untyped_storage()
                key = (st.data_ptr(), st.nbytes())
                if key not in storages:
                    storages.add(key)
                    total += st.nbytes()
            if o.grad is not None:
                stack.append(o.grad)
            stack.extend(gc.get_referents(o))  # attributes set on the tensor
            continue
        if isinstance(o, types.FunctionType):
            stack.extend([*(c.cell_contents for c in (o.__closure__ or ()) if c.cell_contents is not None), *(o.__defaults__ or ())])
            continue
        stack.extend(gc.get_referents(o))
    return total


def memory(T: int) -> dict:
    """What the strategy holds at T stored masks, as bytes and bits per stored mask weight: after storing, and
    after warm one-shot inference (caches included); plus the peak RSS growth of a fresh process doing the same."""
    s = strategy_with(T)
    per_mask = sum(int(layer.weight.numel()) for layer in s.net.masked_layers())
    stored = tensor_bytes(s)
    x16 = torch.randn(16, 1, 28, 28)
    for _ in range(3):
        infer_task(s, x16, "one_shot")
    held = tensor_bytes(s)
    out = {"stored mask weights": T * per_mask, "MiB held after storing": stored / 2**20,
           "MiB held after one-shot inference": held / 2**20,
           "bits per stored weight, after storing": 8 * stored / (T * per_mask),
           "bits per stored weight, after one-shot inference": 8 * held / (T * per_mask)}
    out.update(rss_child(T))
    print(f"\n== memory at T={T}: " + "; ".join(f"{k} {v:.2f}" for k, v in out.items()))
    return out


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_child(T: int) -> dict:
    """Peak RSS growth (VmHWM after - VmRSS before) of a fresh process that builds the T-mask strategy and runs
    one-shot inference; empty where /proc is missing."""
    if not Path("/proc/self/status").exists():
        return {}
    code = (f"import sys, json; sys.path[:0] = {[str(Path(__file__).parent)]!r}; import torch; torch.set_num_threads(1); "
            "import bench_supermask as b; from kbricks.continual.inference import infer_task; x = torch.randn(16, 1, 28, 28); "
            "b.strategy_with(2); before = b._status('VmRSS'); open('/proc/self/clear_refs', 'w').write('5'); "
            f"s = b.strategy_with({T}); [infer_task(s, x, 'one_shot') for _ in range(3)]; "
            "print(json.dumps([before, b._status('VmHWM'), b._status('VmRSS')]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, check=True)
        before, peak, after = json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        print(f"  (peak RSS not measured: {exc})")
        return {}
    return {"peak RSS growth MiB (fresh process)": (peak - before) / 2**20, "RSS growth held MiB (fresh process)": (after - before) / 2**20}


def store_times(counts):
    """Median seconds of one store while T masks are stored one after another into an empty bank (packing, and the
    capacity doubling whenever it is full); the same few masks are cycled for every T, so every T reads the same
    (cache-warm) inputs. The median is robust to other processes on the machine; the growth steps are included in
    the mean, reported as ``mean ms``; the IQR is over the individual stores."""
    net = supermask(create_model("masked_mlp", num_classes=10, in_channels=1, image_size=28), 0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    pool = [[torch.rand(layer.weight.shape, generator=g) < 0.5 for layer in net.masked_layers()] for _ in range(min(counts))]
    samples = {}
    for T in counts:
        fresh = supermask(create_model("masked_mlp", num_classes=10, in_channels=1, image_size=28), 0.5, seed=0)
        times = []
        for i in range(T):
            t0 = time.perf_counter()
            fresh.store(pool[i % len(pool)])
            times.append(time.perf_counter() - t0)
        samples[T] = [1e3 * t for t in times]
    first = statistics.median(samples[counts[0]])  # ratios: each store to the median store at the first T
    return {f"T={T}": {"ms": summary(ms), "ratio": summary([m / first for m in ms]), "mean ms": statistics.fmean(ms)}
            for T, ms in samples.items()}


def main():
    counts, cold_counts, mem_t = ((5, 20), (5, 20), 20) if quick() else (TASK_COUNTS, (5, 250), 250)
    out = {"mlp": bench_mlp(), "conv": bench_conv(batch=16 if quick() else 256), **bench_growth(counts)}
    out["one-shot inference, cold vs warm"] = cold_warm(cold_counts)
    out[f"memory at T={mem_t}"] = {"title": f"memory held by a SupSup strategy with T={mem_t} stored masks (MLP 784-300-100-10)",
                                   "compares": "Bytes of every tensor reachable from the strategy (weights, packed masks, caches) per stored "
                                               "mask weight, after storing and after one-shot inference; peak RSS growth of a fresh process.",
                                   "T": mem_t, "values": memory(mem_t)}
    return out


if __name__ == "__main__":
    main()
