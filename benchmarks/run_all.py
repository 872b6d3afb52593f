"""`make bench`: every performance ratio the project reports, measured side by side in one run.

Writes results/bench.json (every number) and results/bench.md: the device, the targets of issue 14 (KF step vs its
bound, the fused TSN bank, trainer vs a minimal loop, the demo's wall time, accelerator options), the 1-vs-2-thread
rows of issue 16, then every block in detail. ``BENCH_ONLY=kf,trainer`` runs a subset (the other benches keep their
last numbers, and the table says when each was measured); ``BENCH_THREADS`` sets the
intra-op threads (default 1, the library's default); ``BENCH_CLOCK=cpu`` times with the CPU clock.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("kf", "trainer", "accel", "threads", "supermask")


def device_line() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"CUDA: {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def run_bench(name: str):
    import importlib

    module = importlib.import_module({"kf": "bench_kf", "trainer": "bench_trainer", "accel": "bench_accel",
                                      "threads": "bench_threads", "supermask": "bench_supermask"}[name])
    t0 = time.time()
    out = module.main()
    print(f"[bench] {name}: {time.time() - t0:.0f} s", flush=True)
    return out


def fmt(x, digits=2, suffix="x"):
    return "—" if x is None else f"{x:.{digits}f}{suffix}"


def target_rows(results) -> list:
    """The five goals of issue 14, each as a ratio."""
    rows = ["| goal | measured | target |", "|---|---|---|"]
    from bench_kf import KF, KF_LOOP, STEP_T8_FUSED, STEP_T8_LOOP

    kf = results.get("kf") or {}
    blocks = {k: v for k, v in kf.items() if f"{KF}/ratio" in v}  # the KF-step blocks (not the TSN-bank-alone one)
    if blocks:
        worst = max(blocks.items(), key=lambda kv: kv[1][f"{KF}/ratio"])
        rows.append(f"| 1. KF step / its bound, default objective (worst of T = 1, 2, 4, 8 on digits and dSprites) | "
                    f"{fmt(worst[1][f'{KF}/ratio'])} ({worst[0]}) | ≤ 1.2x |")
        for d in ("digits", "dsprites"):
            scaling = kf.get(f"{d}, T=8 vs T=1")
            if scaling:  # step(T=1) and step(T=8) timed in one interleaved block
                rows.append(f"| 2. KF step(T=8) / step(T=1), {d}: TSNs one by one → fused bank (the steps' FLOP ratio: "
                            f"{fmt(scaling['flop ratio T=8 / T=1'])}; per extra TSN {scaling['ms per extra TSN, one by one']:.1f} → "
                            f"{scaling['ms per extra TSN, fused bank']:.1f} ms) | {fmt(scaling[f'{STEP_T8_LOOP}/ratio'])} → "
                            f"{fmt(scaling[f'{STEP_T8_FUSED}/ratio'])} | ≤ 1.5x{' (digits)' if d == 'digits' else ''} |")
            elif f"{d}, T=8" in blocks and f"{d}, T=1" in blocks:
                t1, t8 = blocks[f"{d}, T=1"], blocks[f"{d}, T=8"]
                rows.append(f"| 2. KF step(T=8) / step(T=1), {d}: TSNs one by one → fused bank | "
                            f"{fmt(t8[f'{KF_LOOP}/ms'] / t1[f'{KF_LOOP}/ms'])} → {fmt(t8[f'{KF}/ms'] / t1[f'{KF}/ms'])} | "
                            f"≤ 1.5x{' (digits)' if d == 'digits' else ''} |")
    for name, block in (results.get("trainer") or {}).items():
        rows.append(f"| 3. trainer / minimal loop, {name}, evaluation at the end (every epoch) | "
                    f"{fmt(block['kbricks run_training, evaluation at the end/ratio'], 3)} "
                    f"({fmt(block['kbricks run_training, evaluation every epoch/ratio'], 3)}) | ≤ 1.05x |")
    demo = results.get("demo") or {}
    d, b = demo.get("idle"), demo.get("busy")
    if d:
        rows.append(f"| 4. `make demo` wall time / 10 min ({d['workers']} workers, {d['cores']} cores, load {d['load_before']:.1f} at start, {d['date']}) | "
                    f"{d['wall_s'] / 600:.2f}x ({d['wall_s'] / 60:.1f} min) | ≤ 1.0x on 2 idle cores |")
    else:
        rows.append("| 4. `make demo` wall time / 10 min | not measured yet (`make demo` writes runs/demo/demo-time.json) | ≤ 1.0x |")
    if d and b:
        rows.append(f"| 4b. (issue 16) `make demo` next to one CPU-bound process / idle ({b['date']}) | "
                    f"{b['wall_s'] / d['wall_s']:.2f}x ({b['wall_s'] / 60:.1f} vs {d['wall_s'] / 60:.1f} min) | ≤ 1.5x |")
    accel = results.get("accel") or {}
    for name, block in accel.items():
        parts = [f"{k[:-6]} {v:.2f}x" for k, v in block.items() if k.endswith("/ratio") and not k.startswith("fp32")]
        rows.append(f"| 5. accelerator options / fp32 eager, {name}, on {device_line().split(',')[0]} | {'; '.join(parts)} | runs (CUDA when present) |")
    return rows


def supermask_rows(results) -> list:
    """Issue 16: the cost of the supermask operations as the number of stored masks T grows (ratios to T = 5)."""
    sm = results.get("supermask") or {}
    rows = []
    for block, (label, target) in {
            "known-task evaluation (1000 images) vs stored masks T": ("known-task evaluation, 1000 images", "≤ 1.2x"),
            "known-task evaluation (16 images) vs stored masks T": ("known-task evaluation, 16 images", "≤ 1.2x"),
            "one-shot inference (16 images) vs stored masks T": ("one-shot task inference, 16 images", "linear: ≤ 50x (T grows 50x)"),
            "storing a mask vs stored masks T": ("storing one more mask", "independent of T"),
    }.items():
        vals = sm.get(block) or {}
        if "T=250/ratio" in vals:
            rows.append(f"| {label}: T = 250 / T = 5 | {vals['T=250/ratio']:.2f}x ({vals['T=250/ms']:.2f} vs {vals['T=5/ms']:.2f} ms) | {target} |")
    return ["| operation | measured | target |", "|---|---|---|", *rows] if rows else []


def thread_rows(results) -> list:
    t = results.get("threads") or {}
    meta = t.get("_meta", {})
    if not t:
        return []
    rows = [f"Wall clock; the machine's 1-minute load average was {meta.get('load_average_1min', float('nan')):.1f} on "
            f"{meta.get('cores')} cores when measured (an idle machine reads ~0). Ratios are to 1 thread with no neighbour.", "",
            "| step | 1 thread | 2 threads | 1 thread, busy neighbour | 2 threads, busy neighbour |", "|---|---|---|---|---|"]
    for name, b in t.items():
        if name.startswith("_"):
            continue
        cells = [f"{b[f'{name}, {k}, {c}/ms']:.1f} ms ({b[f'{name}, {k}, {c}/ratio']:.2f}x)"
                 for c in ("no neighbour", "one busy neighbour") for k in ("1 thread", "2 threads")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def refresh_demo(results) -> None:
    """`make demo` timings live in runs/demo/ (not committed): copy the newest into the results kept in bench.json.
    demo-time-busy.json is a `make demo` run next to one CPU-bound process, copied there by hand."""
    demo = results.setdefault("demo", {})
    for key, name in (("idle", "demo-time.json"), ("busy", "demo-time-busy.json")):
        path = ROOT / "runs" / "demo" / name
        if path.exists():
            demo[key] = json.loads(path.read_text())


def main() -> None:
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    only = [b for b in os.environ.get("BENCH_ONLY", ",".join(BENCHES)).split(",") if b]
    device = device_line()
    print(f"[bench] {device}; {threads} intra-op thread(s); clock {os.environ.get('BENCH_CLOCK', 'wall')}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = ROOT / "results" / "bench.json"
    saved = json.loads(out.read_text()) if out.exists() and set(only) != set(BENCHES) else {}
    results = saved.get("results", {})  # a subset run (BENCH_ONLY) keeps the other benches' last numbers
    meta = {"device": device, "threads": threads, "torch": torch.__version__, "clock": os.environ.get("BENCH_CLOCK", "wall"),
            "load_average_at_start": load, "commit": git_commit(), "date": datetime.date.today().isoformat()}
    measured = saved.get("measured", {})
    refresh_demo(results)
    for name in only:
        results[name] = run_bench(name)
        measured[name] = {k: meta[k] for k in ("commit", "date", "load_average_at_start")}
        torch.set_num_threads(threads)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "measured": measured, "results": results}, indent=2))
    render(results, meta, measured)


def when(measured, meta) -> list:
    """A line naming the commit and date of each bench when a subset run (BENCH_ONLY) left some from earlier."""
    measured = measured or {}
    if all(m["commit"] == meta["commit"] for m in measured.values()):
        return []
    parts = [f"{name} at commit {m['commit']} ({m['date']}, load {m['load_average_at_start']:.1f})" for name, m in measured.items()]
    return ["", "Benches measured in different runs: " + "; ".join(parts) + "."]


def render(results, meta, measured=None) -> None:
    """results/bench.md from the measured numbers (``python benchmarks/run_all.py --render`` redraws it from
    results/bench.json, e.g. after a `make demo` measurement)."""
    out = ROOT / "results" / "bench.json"
    device, threads, load = meta["device"], meta["threads"], meta["load_average_at_start"]
    lines = ["# Benchmarks", "",
             f"`make bench` on {device}, {threads} intra-op thread(s) unless a row says otherwise, {meta['clock']} clock, "
             f"commit {meta['commit']}, {meta['date']}; 1-minute load average {load:.1f} at the start. Candidates are timed "
             "interleaved in one process (median of rounds); each ratio is to the first row of its block.", *when(measured, meta), "",
             "## Issue 14 targets", ""] + target_rows(results)
    supermask = supermask_rows(results)
    if supermask:
        lines += ["", "## Issue 16 targets: supermask cost against the number of stored masks", ""] + supermask
    if "threads" in results:
        lines += ["", "## Threads (issue 16): 1 vs 2 intra-op threads, alone and next to one CPU-bound process", ""] + thread_rows(results)
    lines.append("")
    for bench, blocks in results.items():
        if bench == "demo":
            continue
        for block, vals in blocks.items():
            if block.startswith("_"):
                continue
            lines += [f"## {bench}: {block}", "", "| candidate | ms | ratio |", "|---|---|---|"]
            for k in [k for k in vals if k.endswith("/ms")]:
                name = k[:-3]
                ratio = vals.get(name + "/ratio")
                lines.append(f"| {name} | {vals[k]:.2f} | {'—' if ratio is None else f'{ratio:.2f}x'} |")
            lines.append("")
    (out.parent / "bench.md").write_text("\n".join(lines))
    print(f"\nwritten {out} and {out.parent / 'bench.md'}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        path = ROOT / "results" / "bench.json"
        saved = json.loads(path.read_text())
        refresh_demo(saved["results"])
        path.write_text(json.dumps(saved, indent=2))
        render(saved["results"], saved["meta"], saved.get("measured"))
    else:
        main()
