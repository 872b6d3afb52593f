"""`make bench`: every performance ratio the project reports, measured side by side in one run.

Writes results/bench.json (every number) and results/bench.md: the goals of issue 24 (met / not met, with the
measured median [IQR]), the earlier targets (issues 14, 16), the rows that got more than 10 % worse than the
committed results/bench.json, then every block: one sentence saying what it compares, and per candidate the median
[IQR] over interleaved rounds of its time and of its per-round ratio to the block's baseline.

Knobs: ``BENCH_ONLY=kf,trainer,accel,threads,supermask`` runs a subset (the other benches keep their last numbers;
the page says when each was measured); ``BENCH_ROUNDS`` (default 7, 5 for the trainer); ``BENCH_QUICK=1`` a smoke
run on tiny sizes (written to runs/bench-quick/ unless ``BENCH_OUT`` says where); ``BENCH_CLOCK=wall`` times with
the wall clock instead of this process's CPU time; ``BENCH_THREADS`` intra-op threads (default 1).
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
from common import clock_name, fmt_stat, quick  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("kf", "trainer", "accel", "threads", "supermask")
WORSE = 1.10  # a row whose median grew by more than this factor against the committed bench.json is flagged
GOAL_TASKS = (1, 2, 4, 8)


def out_dir() -> Path:
    if os.environ.get("BENCH_OUT"):
        return Path(os.environ["BENCH_OUT"])
    return ROOT / ("runs/bench-quick" if quick() else "results")


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


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return ""


def committed() -> dict:
    """The committed results/bench.json (HEAD), else the file on disk; {} when neither exists."""
    text = git("show", "HEAD:results/bench.json")
    if not text:
        path = ROOT / "results" / "bench.json"
        text = path.read_text() if path.exists() else ""
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def committed_results() -> dict:
    return committed().get("results", {})


def run_bench(name: str):
    import importlib

    module = importlib.import_module({"kf": "bench_kf", "trainer": "bench_trainer", "accel": "bench_accel",
                                      "threads": "bench_threads", "supermask": "bench_supermask"}[name])
    t0 = time.time()
    out = module.main()
    print(f"[bench] {name}: {time.time() - t0:.0f} s", flush=True)
    return out


# ---- rows: every comparable number, old (flat "<candidate>/ratio") and new (summaries) bench.json alike ----------


def flat_rows(results: dict) -> dict:
    """{(bench, block, row): median} of every lower-is-better number: each non-baseline candidate's ratio, and the
    memory values. The pre-issue-24 layout ("<candidate>/ratio" keys) reads as the same rows, so old files compare."""
    rows = {}
    for bench, blocks in (results or {}).items():
        if bench == "demo" or not isinstance(blocks, dict):
            continue
        for block, vals in blocks.items():
            if block.startswith("_") or not isinstance(vals, dict):
                continue
            if "candidates" in vals:
                for cand, r in vals["candidates"].items():
                    if cand != vals.get("baseline") and isinstance(r, dict) and "ratio" in r:
                        rows[(bench, block, cand)] = r["ratio"]["median"]
                if "growth / FLOP growth" in vals:
                    rows[(bench, block, "growth / FLOP growth")] = vals["growth / FLOP growth"]["median"]
            elif "values" in vals:
                for k, v in vals["values"].items():
                    if isinstance(v, (int, float)) and ("MiB" in k or "bits" in k):
                        rows[(bench, block, k)] = float(v)
            else:  # old layout
                for k, v in vals.items():
                    if k.endswith("/ratio") and isinstance(v, (int, float)) and v != 1.0:
                        rows[(bench, block, k[:-6])] = float(v)
    return rows


def regressions(new: dict, old: dict, benches) -> dict:
    """{row: (old, new)} for the rows of the measured benches whose median grew by more than 10 %."""
    a, b = flat_rows(old), flat_rows(new)
    return {k: (a[k], v) for k, v in b.items() if k[0] in benches and k in a and a[k] > 0 and v > WORSE * a[k]}


def change(key, new_rows, old_rows) -> str:
    if key not in new_rows:
        return ""
    if key not in old_rows:
        return "new"
    rel = new_rows[key] / old_rows[key] - 1 if old_rows[key] else 0.0
    text = f"{100 * rel:+.0f} %"
    return f"**{text} worse (> 10 %)**" if new_rows[key] > WORSE * old_rows[key] else text


# ---- goals ------------------------------------------------------------------------------------------------------


def goal(label: str, stat, target: float, unit: str = "x", digits: int = 2) -> dict:
    if stat is None:
        return {"goal": label, "measured": "not measured", "target": f"≤ {target:g}{unit}", "status": "not measured"}
    return {"goal": label, "measured": fmt_stat(stat, digits, unit), "target": f"≤ {target:g}{unit}",
            "status": "met" if stat["median"] <= target else "not met"}


def issue24_goals(results: dict) -> list:
    """The goals of issue 24, each with the measured median [IQR] and met / not met (on the median)."""
    from bench_kf import KF

    kf, sm = results.get("kf") or {}, results.get("supermask") or {}
    rows = []
    for d in ("digits", "dsprites"):
        for t in GOAL_TASKS:
            block = kf.get(f"{d}, T={t}, plain bound", {}).get("candidates", {})
            rows.append(goal(f"KF step / plain bound, {d}, T={t}", (block.get(KF) or {}).get("ratio"), 1.15))
    for d in ("digits", "dsprites"):
        growth = next((v for k, v in kf.items() if k.startswith(f"{d}, growth T=1 to")), None)
        big = growth["big T"] if growth else 8
        label = (f"fused KF step growth T=1→{big} / FLOP growth, {d}"
                 + (f" (step ratio {fmt_stat(growth['candidates'][f'kf step, T={big}, fused bank']['ratio'], suffix='x')}, "
                    f"FLOP ratio {growth['flop ratio']:.2f}x)" if growth else ""))
        rows.append(goal(label, growth["growth / FLOP growth"] if growth else None, 1.1))
    mem = next((v for k, v in sm.items() if k.startswith("memory at T=")), None)
    t_mem = mem["T"] if mem else 250
    bits = (mem or {}).get("values", {}).get("bits per stored weight, after one-shot inference")
    stat = {"median": bits, "iqr": [bits, bits]} if bits is not None else None
    r = goal(f"one-shot inference, T={t_mem}: memory held per stored mask weight (every tensor the strategy holds, caches included)",
             stat, 2, " bits", 1)
    if bits is not None:
        r["measured"] = f"{bits:.1f} bits (deterministic)"
    rows.append(r)
    cw = (sm.get("one-shot inference, cold vs warm") or {}).get("candidates", {})
    cold = [k for k in cw if "cold" in k]
    big_cold = max(cold, key=lambda k: int(k.split(",")[0][2:])) if cold else None
    rows.append(goal(f"one-shot inference, {big_cold.split(',')[0] if big_cold else 'T=250'}: cold (first call) / warm",
                     cw[big_cold]["ratio"] if big_cold else None, 2))
    return rows


def earlier_targets(results: dict) -> list:
    """Issue 14 / 16 targets that still apply (trainer overhead, the demo's wall time, supermask cost against T)."""
    rows = []
    for name, block in (results.get("trainer") or {}).items():
        c = block.get("candidates", {}).get("kbricks run_training")
        if c:
            rows.append(goal(f"trainer / plain torch loop, {name} (evaluation at the end)", c["ratio"], 1.05, digits=3))
    demo = (results.get("demo") or {}).get("idle")
    if demo:
        rows.append({"goal": f"`make demo` wall time ({demo['workers']} workers, {demo['cores']} cores, load {demo['load_before']:.1f}, {demo['date']})",
                     "measured": f"{demo['wall_s'] / 60:.1f} min", "target": "≤ 10 min on 2 idle cores",
                     "status": "met" if demo["wall_s"] <= 600 else "not met"})
    sm = results.get("supermask") or {}
    for block, (label, target) in {"known-task evaluation (1000 images) vs stored masks T": ("known-task evaluation, 1000 images", 1.2),
                                   "known-task evaluation (16 images) vs stored masks T": ("known-task evaluation, 16 images", 1.2),
                                   "storing a mask vs stored masks T": ("storing one more mask", 1.2)}.items():
        c = (sm.get(block) or {}).get("candidates", {})
        big = max(c, key=lambda k: int(k[2:])) if c else None
        if big and big != f"T={min(int(k[2:]) for k in c)}":
            rows.append(goal(f"{label}: {big} / T={min(int(k[2:]) for k in c)}", c[big]["ratio"], target))
    return rows


def goal_table(rows) -> list:
    return ["| goal | measured: median [IQR] | target | status |", "|---|---|---|---|",
            *(f"| {r['goal']} | {r['measured']} | {r['target']} | {r['status']} |" for r in rows)]


# ---- the page ---------------------------------------------------------------------------------------------------


def when(measured, meta) -> list:
    """A line naming the commit and date of each bench when a subset run (BENCH_ONLY) left some from earlier."""
    measured = measured or {}
    if all(m["commit"] == meta["commit"] for m in measured.values()):
        return []
    parts = [f"{name} at commit {m['commit']} ({m['date']}, load {m['load_average_at_start']:.1f})" for name, m in measured.items()]
    return ["", "Benches measured in different runs: " + "; ".join(parts) + "."]


def block_table(bench: str, block: str, vals: dict, new_rows: dict, old_rows: dict) -> list:
    lines = [f"## {bench}: {vals.get('title', block)}", "", vals.get("compares", ""), ""]
    if "values" in vals:
        lines += ["| quantity | value | vs committed |", "|---|---|---|"]
        for k, v in vals["values"].items():
            lines.append(f"| {k} | {v:,.2f} | {change((bench, block, k), new_rows, old_rows)} |")
        return lines + [""]
    lines += [f"| candidate | ms: median [IQR] | wall ms | ratio to {vals['baseline']}: median [IQR] | vs committed |", "|---|---|---|---|---|"]
    for cand, r in vals["candidates"].items():
        wall = f"{r['wall_ms']['median']:.2f}" if "wall_ms" in r else "—"
        lines.append(f"| {cand} | {fmt_stat(r['ms'])} | {wall} | {fmt_stat(r['ratio'], suffix='x')} | "
                     f"{change((bench, block, cand), new_rows, old_rows)} |")
    if "growth / FLOP growth" in vals:
        lines.append(f"| growth / FLOP growth (FLOP ratio {vals['flop ratio']:.2f}x) | | | {fmt_stat(vals['growth / FLOP growth'], suffix='x')} | "
                     f"{change((bench, block, 'growth / FLOP growth'), new_rows, old_rows)} |")
    extra = {k: v for k, v in vals.items() if k.startswith("trained")}
    if extra:
        lines += ["", "; ".join(f"{k}: {100 * v:.1f} %" for k, v in extra.items() if v is not None) + " (results/runs/cl/scale)."]
    return lines + [""]


def render(results, meta, measured=None, old=None, out=None, old_meta=None) -> str:
    """bench.md from the measured numbers (``python benchmarks/run_all.py --render`` redraws it from bench.json).
    ``old``: the results to flag regressions against (default: the committed bench.json); a smoke run flags none."""
    out = out or out_dir()
    if old is None:
        saved = committed()
        old, old_meta = saved.get("results", {}), saved.get("meta", {})
    if meta.get("quick"):
        old = {}
    new_rows, old_rows = flat_rows(results), flat_rows(old)
    flagged = regressions(results, old, [b for b in results if b != "demo"])
    elsewhere = (f" The committed numbers were measured on {old_meta['device']} ({old_meta.get('clock', 'wall')} clock), "
                 "this run's on another device: read the changes with that in mind."
                 if old_meta and old_meta.get("device") not in (None, meta["device"]) else "")
    lines = ["# Benchmarks", "",
             f"`make bench` on {meta['device']}, {meta['threads']} intra-op thread(s) unless a row says otherwise, {meta['clock']} clock, "
             f"commit {meta['commit']}, {meta['date']}; 1-minute load average {meta['load_average_at_start']:.1f} at the start"
             f"{' — QUICK SMOKE RUN: the numbers mean nothing' if meta.get('quick') else ''}. "
             "Candidates alternate within each round (order rotated) in one process; every ratio is computed within a round "
             "and reported as the median [interquartile range, 25–75 %] over the rounds (at least 5 for a full run). "
             "Bounds and baselines are plain PyTorch written in the bench files (benchmarks/bench_kf.py `bound_step`, "
             "benchmarks/bench_trainer.py `plain_loop`).", *when(measured, meta), "",
             "## Issue 24 goals", "", *goal_table(issue24_goals(results)), "",
             "## Earlier targets (issues 14, 16)", "", *goal_table(earlier_targets(results)), "",
             "## Regressions against the committed results/bench.json", "",
             "Each block's last column compares the row's median with the committed file's (time ratios, memory values; "
             f"lower is better); more than 10 % worse is flagged here and in bold.{elsewhere}", ""]
    if meta.get("quick"):
        lines.append("Not compared: a smoke run (BENCH_QUICK).")
    elif flagged:
        lines += ["Rows whose median got more than 10 % worse (ratios for timings, values for memory):", "",
                  "| bench | block | row | committed | now |", "|---|---|---|---|---|",
                  *(f"| {b} | {blk} | {row} | {o:.3g} | **{n:.3g}** |" for (b, blk, row), (o, n) in flagged.items())]
    else:
        lines.append("None: no row's median got more than 10 % worse (rows missing from the committed file are new).")
    lines.append("")
    for bench, blocks in results.items():
        if bench == "demo":
            continue
        for block, vals in blocks.items():
            if block.startswith("_") or not isinstance(vals, dict) or not ("candidates" in vals or "values" in vals):
                continue
            lines += block_table(bench, block, vals, new_rows, old_rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text("\n".join(lines))
    for (b, blk, row), (o, n) in flagged.items():
        print(f"[bench] REGRESSION > 10 %: {b} / {blk} / {row}: {o:.3g} -> {n:.3g}")
    print(f"\nwritten {out / 'bench.json'} and {out / 'bench.md'}")
    return "\n".join(lines)


def refresh_demo(results) -> None:
    """`make demo` timings live in runs/demo/ (not committed): copy the newest into the results kept in bench.json."""
    demo = results.setdefault("demo", {})
    for key, name in (("idle", "demo-time.json"), ("busy", "demo-time-busy.json")):
        path = ROOT / "runs" / "demo" / name
        if path.exists():
            demo[key] = json.loads(path.read_text())


def main() -> None:
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    only = [b for b in os.environ.get("BENCH_ONLY", ",".join(BENCHES)).split(",") if b]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        raise SystemExit(f"BENCH_ONLY: unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    device = device_line()
    print(f"[bench] {device}; {threads} intra-op thread(s); clock {clock_name()}{'; QUICK smoke run' if quick() else ''}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = out_dir()
    path = out / "bench.json"
    old_saved = committed()
    saved = json.loads(path.read_text()) if path.exists() and set(only) != set(BENCHES) else {}
    saved_results = saved.get("results", {})
    results = {k: v for k, v in saved_results.items() if k not in only}  # a subset run keeps the other benches' last numbers
    meta = {"device": device, "threads": threads, "torch": torch.__version__, "clock": clock_name(), "quick": quick(),
            "load_average_at_start": load, "commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
            "date": datetime.date.today().isoformat()}
    measured = {k: v for k, v in saved.get("measured", {}).items() if k in results}
    refresh_demo(results)
    t0 = time.time()
    for name in only:
        results[name] = run_bench(name)
        measured[name] = {k: meta[k] for k in ("commit", "date", "load_average_at_start")}
        torch.set_num_threads(threads)
    meta["seconds"] = round(time.time() - t0)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "measured": measured, "results": results}, indent=2))
    render(results, meta, measured, old_saved.get("results", {}), out, old_saved.get("meta", {}))
    print(f"[bench] all benches: {meta['seconds']} s")


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        path = out_dir() / "bench.json"
        saved = json.loads(path.read_text())
        refresh_demo(saved["results"])
        path.write_text(json.dumps(saved, indent=2))
        old_saved = committed()  # the regression section compares with the committed file, as a full run does
        render(saved["results"], saved["meta"], saved.get("measured"), old_saved.get("results", {}), None, old_saved.get("meta", {}))
    else:
        main()
