"""Time and memory per epoch of every paper-scale recipe run (configs/paper/), at full model size, and the cost of
the full run projected from them.

Each run's own training step (the engine's Loop: batch indexing, augmentation, forward, backward, optimiser step)
is timed for a few steps on a synthetic data root in the real on-disk formats: CPU at batch 8 (``BENCH_RECIPE_BATCH``),
CUDA at the recipe's batch. Per run:

* ms per training sample and per evaluated sample (forward only);
* training FLOPs per sample (``torch.utils.flop_counter`` on one step: forward + backward, meta steps included);
* memory: parameters + gradients + optimiser state (counted), the tensors autograd saves for backward at the recipe's
  batch (measured at the timing batch and at half of it, extrapolated linearly), the dataset held in memory
  (float32), and on CUDA the measured peak (``max_memory_allocated``) of the timed steps;
* the projection: one epoch of the paper data set and the full run (epochs x tasks), on this device.

``main()`` returns blocks like the other benches (ms per training sample, ratio to the first run) and writes
results/bench_recipes.md with the projection table.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from kbricks import load_config
from kbricks.core.seeding import pick_device
from kbricks.engine.experiment import build_experiment
from kbricks.engine.trainer import Loop
from kbricks.methods import Batch
from kbricks.models import count_parameters
from kbricks.studies import configs_root, paper

# the paper data sets: training / test images, and how a run walks them
CIFAR = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}
SPLIT_TASK = (2_500, 500)  # one SplitCIFAR100 task: 5 classes x 500 / x 100
SOURCE_IMAGES = (100_000, 5_000)  # an assumed ImageFolder source (e.g. a 100-class ImageNet subset at 32 px)
SEEDS = 3


@dataclass
class Job:
    run: str  # a key of paper.RUNS
    label: str
    overrides: tuple = ()
    stage: Optional[str] = None  # continual: which stage is timed
    same_cost: tuple = ()  # runs whose step costs the same (they differ in a linear head); projected from this one


# one job per distinct cost: the CIFAR-100 coarse teacher and the CIFAR-100 SSKT runs differ from their CIFAR-10
# counterparts only in the size of a linear head (and the epochs, which the projection takes from each config)
JOBS = [
    Job("teacher-cifar10", "teacher WRN-28-2", same_cost=("teacher-cifar100coarse",)),
    Job("kf-cifar10-1task", "KF 1 task: CKN WRN-28-2 + TSN MBv2x0.5"),
    Job("kd-cifar10-wrn40_2", "KD student WRN-40-2"),
    Job("kf-cifar10-2tasks", "KF 2 tasks (CIFAR-10)"),
    Job("kd-cifar10-wrn28_3", "KD student WRN-28-3"),
    Job("kf-cifar100coarse-4tasks", "KF 4 tasks (CIFAR-100 coarse)"),
    Job("kd-cifar100coarse-wrn40_3", "KD student WRN-40-3"),
    Job("supsup-splitcifar100", "SupSup mask (= ImpressLearn impression), GEMResNet18", stage="mask"),
    # random impressions are stored at once, so task 0's first stage is the coefficients over k = 5 masks
    Job("impresslearn-splitcifar100", "ImpressLearn coefficients, k = 5", ("method.source=random",), stage="alpha"),
    Job("sskt-source-imagenet", "SSKT source ResNet-18 at 32 px", same_cost=("sskt-source-places365",)),
    Job("sskt-cifar10-scratch", "scratch ResNet-20", same_cost=("sskt-cifar100-scratch",)),
    Job("sskt-cifar10-teacher", "KD teacher ResNet-56", same_cost=("sskt-cifar100-teacher",)),
    Job("sskt-cifar10-kd", "KD ResNet-56 -> ResNet-20", same_cost=("sskt-cifar100-kd",)),
    Job("sskt-cifar10-dml", "DML 2 x ResNet-20", same_cost=("sskt-cifar100-dml",)),
    Job("sskt-cifar10-maxl", "MAXL ResNet-20 (psi 10; CIFAR-100: psi 5)", same_cost=("sskt-cifar100-maxl",)),
    Job("sskt-cifar10-sskt", "SSKT ResNet-20 + 2 sources", same_cost=("sskt-cifar100-sskt",)),
]
DEPENDENCIES = ("teacher-cifar10", "teacher-cifar100coarse", "sskt-source-imagenet", "sskt-source-places365", "sskt-cifar10-teacher",
                "sskt-cifar100-teacher")
QUIET = ("train.progress=off", "train.plots=false")


def make_batch(data, transform, n: int, device) -> Batch:
    raw = data.x[:n].to(device)
    return Batch(x=transform(raw, train=True), y=data.y[:n].to(device), raw=raw)


def saved_bytes_and_flops(module, batch: Batch) -> tuple:
    """Bytes of the tensors saved for backward (distinct storages, the module's own parameters and buffers left out:
    they are counted as static memory) and FLOPs (matmul / conv) of one forward + backward."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    storages: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with FlopCounterMode(display=False) as fc:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = module.training_step(batch)["loss"]
        loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(storages.values()), fc.get_total_flops()


def optimizer_state_floats(optim_name: str) -> int:
    return {"sgd": 1, "rmsprop": 1, "adam": 2, "adamw": 2}[optim_name]


def measure(job: Job, root: Path, out: Path, batch: int, steps: int, device, quiet) -> Dict[str, Any]:
    run = paper.RUNS[job.run]
    over = paper.run_overrides(job.run, 0, root, out, False, [*quiet, *job.overrides, f"train.batch_size={batch}",
                                                                 f"train.max_steps_per_epoch={steps + 1}", f"train.device={device.type}"])
    cfg = load_config(configs_root() / run.config, over)
    recipe_batch = load_config(configs_root() / run.config).train.batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    exp = build_experiment(cfg, device)
    method = exp.method
    if exp.scenario is not None:
        method.before_task(0)
        stage = method.stages(0)[0]
        assert stage.name == job.stage, (job.run, stage.name)
        params, data, optim = method.begin_stage(stage), exp.scenario[0].train, stage.optim
    else:
        params, data, optim = list(method.trainable_parameters()), exp.data.train, cfg.optim
    stamps: List[float] = []
    loop = Loop(method, params, data, exp.transform, optim, cfg.train, 1, device, (0,),
                on_step=lambda step, losses: stamps.append(time.perf_counter()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop.run_epoch(0)  # step 1 warms up; steps 2.. are timed (on_step runs after each optimiser step)
    step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    method.train()
    # saved activations at two batch sizes: a fixed part (e.g. combined masks) plus a part linear in the batch
    half, _ = saved_bytes_and_flops(method, make_batch(data, exp.transform, batch // 2, device))
    saved, flops = saved_bytes_and_flops(method, make_batch(data, exp.transform, batch, device))
    per_sample = (saved - half) / (batch - batch // 2)
    activations = saved + per_sample * (recipe_batch - batch)
    if exp.scenario is not None:
        method.end_stage(stage)  # store the mask / coefficients: evaluation reads them
    # evaluation: forward only, as the engine runs it
    method.eval()
    x = exp.transform(data.x[:batch].to(device), train=False)
    predict = (lambda: method.predict_task(x, 0)) if exp.scenario is not None else (lambda: method.predict(x))
    with torch.no_grad():
        predict()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        predict()
        if device.type == "cuda":
            torch.cuda.synchronize()
        eval_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in params)
    static = 4 * n_params * (2 + optimizer_state_floats(optim.name)) + 4 * sum(b.numel() for b in method.buffers())
    static += 4 * sum(p.numel() for p in method.parameters() if not p.requires_grad)
    return {
        "label": job.label, "run": job.run, "batch": batch, "recipe_batch": recipe_batch,
        "ms_per_sample": 1e3 * step_s / batch, "eval_ms_per_sample": 1e3 * eval_s / batch,
        "train_gflop_per_sample": flops / batch / 1e9, "params": count_parameters(method.export_module()) if exp.scenario is None else n_params,
        "static_mb": static / 2**20, "activations_mb_at_recipe_batch": activations / 2**20,
        "peak_mb_measured": peak, "peak_at": f"{device.type}, batch {batch}",
    }


def plan_of(run_id: str) -> Dict[str, Any]:
    """How much data one epoch sees, and how many epochs (x tasks / stages) the full run has."""
    cfg = load_config(configs_root() / paper.RUNS[run_id].config)
    data = paper.RUNS[run_id].data
    seeds = 1 if paper.RUNS[run_id].shared else SEEDS
    if cfg.is_continual:
        p = cfg.method.params()
        if cfg.method.name == "impresslearn":  # coefficients for every task; the impressions cost what SupSup masks cost
            return {"train": SPLIT_TASK[0], "test": SPLIT_TASK[1], "epochs": p["alpha_epochs"] * cfg.data.scenario.kwargs()["num_tasks"],
                    "what": f"{p['alpha_epochs']} epochs x 20 tasks (+ {p['impressions']} impressions at the SupSup row's cost)",
                    "seeds": seeds, "eval_every": p["alpha_epochs"]}
        return {"train": SPLIT_TASK[0], "test": SPLIT_TASK[1], "epochs": cfg.train.epochs * cfg.data.scenario.kwargs()["num_tasks"],
                "what": f"{cfg.train.epochs} epochs x 20 tasks", "seeds": seeds, "eval_every": cfg.train.epochs}
    n = SOURCE_IMAGES if data.startswith("source") else CIFAR[data]
    return {"train": n[0], "test": n[1], "epochs": cfg.train.epochs, "what": f"{cfg.train.epochs} epochs", "seeds": seeds,
            "eval_every": cfg.train.eval_every}


def project(m: Dict[str, Any]) -> Dict[str, Any]:
    p = plan_of(m["run"])
    epoch_s = m["ms_per_sample"] * p["train"] / 1e3 + m["eval_ms_per_sample"] * p["test"] / 1e3 / p["eval_every"]
    data_mb = 4 * 3 * 32 * 32 * (p["train"] + p["test"]) / 2**20
    if m["run"].endswith("splitcifar100"):
        data_mb = 2 * 4 * 3 * 32 * 32 * 60_000 / 2**20  # CIFAR-100 and its 20 per-task copies
    return {**m, **p, "epoch_s": epoch_s, "run_hours": epoch_s * p["epochs"] / 3600, "run_pflop": m["train_gflop_per_sample"] * p["train"] * p["epochs"] / 1e6,
            "dataset_mb": data_mb, "memory_mb_projected": m["static_mb"] + m["activations_mb_at_recipe_batch"] + data_mb}


def table(rows: List[Dict[str, Any]], device: str, threads: int, load: str) -> str:
    lines = ["# Paper-scale recipes: cost per epoch and projected full runs", "",
             f"`benchmarks/bench_recipes.py` on {device} ({threads} threads; load average before / after: {load}), torch {torch.__version__}; "
             "each run's own training step "
             f"timed at batch {rows[0]['batch']} on synthetic data at full model size. Epoch = CIFAR's 50,000 training images "
             "(SplitCIFAR100: one task's 2,500; a source: an assumed 100,000-image ImageFolder), evaluation every `eval_every` epochs. "
             "Full run = all epochs (x tasks) of one seed. Memory (MB): parameters + gradients + optimiser state, activations saved "
             "for backward at the recipe's batch (measured at the timing batch and half of it, extrapolated), dataset in memory as "
             "float32.", "",
             "| run | params (exported) | GFLOP / sample (fwd+bwd) | ms / sample | s / epoch | full run | hours, full run | PFLOP, full run | "
             "memory: static + activations + data | measured peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mb_measured']:.0f} MB ({r['peak_at']})" if r["peak_mb_measured"] is not None else "(CUDA only)"
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f} M |" if r["params"] >= 10_000 else f"| {r['label']} | {r['params']} |")
        lines[-1] += (f" {r['train_gflop_per_sample']:.2f} | {r['ms_per_sample']:.1f} | {r['epoch_s']:.0f} | "
                     f"{r['what']} | {r['run_hours']:.1f} | {r['run_pflop']:.2f} | {r['static_mb']:.0f} + {r['activations_mb_at_recipe_batch']:.0f} + "
                     f"{r['dataset_mb']:.0f} = {r['memory_mb_projected']:.0f} | {peak} |")
    return "\n".join(lines) + "\n"


def per_recipe(rows: List[Dict[str, Any]]) -> List[str]:
    """Each recipe's full cost: every run x its seeds (shared runs once), and the largest memory of its runs."""
    by_run = {r["run"]: r for r in rows}
    lines = ["", "| recipe | runs | hours, all runs and seeds | PFLOP, all runs and seeds | largest run memory (MB) |", "|---|---|---|---|---|"]
    for rec in paper.RECIPES.values():
        runs = rec.run_order()
        if not all(r in by_run for r in runs):
            continue
        hours = sum(by_run[r]["run_hours"] * by_run[r]["seeds"] for r in runs)
        pflop = sum(by_run[r]["run_pflop"] * by_run[r]["seeds"] for r in runs)
        if "impresslearn-splitcifar100" in runs and "supsup-splitcifar100" in by_run:  # its impressions are SupSup masks
            sup, k = by_run["supsup-splitcifar100"], 5
            hours += sup["run_hours"] / 20 * k * SEEDS
            pflop += sup["run_pflop"] / 20 * k * SEEDS
        memory = max(by_run[r]["memory_mb_projected"] for r in runs)
        lines.append(f"| {rec.name} | {len(runs)} | {hours:,.0f} | {pflop:,.0f} | {memory:,.0f} |")
    return lines + ["", f"({SEEDS} seeds; teachers and sources once, and counted in every recipe that uses them.)", ""]


def main() -> Dict[str, Dict[str, float]]:
    device = pick_device("auto")
    batch = int(os.environ.get("BENCH_RECIPE_BATCH", "8")) if device.type == "cpu" else 0
    steps = int(os.environ.get("BENCH_RECIPE_STEPS", "2"))
    only = [j for j in os.environ.get("BENCH_RECIPES", "").split(",") if j]
    torch.manual_seed(0)
    quiet = [*QUIET, f"train.num_threads={torch.get_num_threads()}"]  # every run keeps the bench's thread count
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # enough images for steps + 1 batches in every data set, the smallest (3 classes, 80 % train) included
        largest = max(batch or load_config(configs_root() / paper.RUNS[j.run].config).train.batch_size for j in JOBS)
        root = paper.write_synthetic_data(Path(tmp) / "data", train_per_class=math.ceil(largest * (steps + 1) / (3 * 0.8)) + 1)
        out = Path(tmp) / "out"
        t0 = time.time()
        for rid in DEPENDENCIES:  # teachers and sources: a real (one-step) run each, so KD / KF / SSKT load them as usual
            paper.train_run(rid, 0, root, out, False, [*quiet, "train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=2",
                                                       f"train.device={device.type}"], configs_root())
        for job in JOBS:
            if only and job.run not in only:
                continue
            b = batch or load_config(configs_root() / paper.RUNS[job.run].config).train.batch_size
            m = project(measure(job, root, out, b, steps, device, quiet))
            rows.append(m)
            rows += [project({**m, "run": other, "label": f"{m['label']} ({other}: same step)"}) for other in job.same_cost]
            print(f"  {job.label:<52s} {m['ms_per_sample']:8.1f} ms/sample  {m['epoch_s']:8.0f} s/epoch  {m['run_hours']:8.1f} h/run  "
                  f"{m['train_gflop_per_sample']:6.2f} GFLOP/sample  peak {m['peak_mb_measured'] or float('nan'):.0f} MB", flush=True)
        print(f"  ({time.time() - t0:.0f} s)")
    load = f"{load0:.1f} / {os.getloadavg()[0]:.1f}"
    text = table(rows, str(device) if device.type == "cpu" else torch.cuda.get_device_name(device), torch.get_num_threads(), load)
    text += "\n".join(per_recipe(rows))
    Path("results").mkdir(exist_ok=True)
    Path("results/bench_recipes.md").write_text(text)
    print(text)
    first = rows[0]["ms_per_sample"]
    block = {}
    for r in rows:
        if "same step" in r["label"]:
            continue
        block[f"{r['run']}/ms"] = r["ms_per_sample"]
        block[f"{r['run']}/ratio"] = r["ms_per_sample"] / first
    return {f"ms per training sample ({device.type}, batch {batch or 'as in the recipe'})": block}


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    main()
