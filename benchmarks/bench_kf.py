"""KF training step vs a plain-PyTorch lower bound, and the step's growth with the number of tasks T.

Plain bound (issue 24), written as plain ``nn.Module`` calls on copies of the method's modules with every hook
removed (see :func:`bound_step`, a few lines): the teacher's forward (no grad), the CKN's forward, every TSN's forward
on its output (encoder, factor head and task-only head), one cross-entropy per task summed, ONE backward and a plain
torch optimiser step with the config's settings. The KF step is the method's real ``training_step`` (shipped config's
objective: KD + CE + bottleneck + task-only heads + InfoMax), its backward and kbricks' optimiser. The bound is NOT
the same work: it omits the InfoMax term's passes (``infomax=teacher``, the shipped configs: the teacher's and CKN's
tapped features and the projectors over them; ``infomax=views``: the CKN's pass over a second augmented view and the
projector head) and the other terms' loss arithmetic (KD, bottleneck KL, task-only heads' losses), so it is a
stricter bound than the same work; the ``infomax_weight=0`` candidate shows how much of the gap InfoMax is. All
run on the same batch, interleaved in one process.

Growth with T (goal: fused step(T=8) / step(T=1) <= 1.1x the FLOP growth) is timed in its own block, step(T=1) and
step(T=8) interleaved, next to the FLOP ratio of the two steps (torch.utils.flop_counter.FlopCounterMode on the
task-by-task path, the same arithmetic as the fused bank).

T tasks: digits ``split: T`` (T class groups); dSprites the first T of [shape, scale, orientation, pos_x, pos_y,
shape, scale, orientation] (T = 8 repeats three latents: the same cost as eight distinct ones).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from common import plain_optimizer, quick, report, time_rounds

from kbricks import load_config
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_training
from kbricks.engine.trainer import make_optimizer
from kbricks.methods import Batch
from kbricks.studies import configs_root

LATENTS = ["shape", "scale", "orientation", "pos_x", "pos_y", "shape", "scale", "orientation"]
DATASETS = {  # teacher config, KF config, tasks override for T
    "digits": ("teacher/digits_cnn.yaml", "kf/digits.yaml", lambda t: f"data.tasks={{split: {t}}}"),
    "dsprites": ("teacher/dsprites_multihead.yaml", "kf/dsprites.yaml", lambda t: f"data.tasks={{latents: [{', '.join(LATENTS[:t])}]}}"),
}
TASKS = (1, 2, 4, 8)  # BENCH_QUICK: (1, 2)


def train_teacher(cfg: str, out: Path) -> Path:
    # timing does not depend on the teacher's quality: two steps give a real teacher run directory
    run_training(load_config(configs_root() / cfg, ["train.epochs=1", "train.progress=off", "train.plots=false",
                                                    "train.max_steps_per_epoch=2", f"train.num_threads={torch.get_num_threads()}"]), out)
    return out


def first_batch(exp, batch_size: int) -> Batch:
    train = exp.data.train
    raw = train.x[:batch_size].to(exp.device)
    return Batch(x=exp.transform(raw, train=True), y=train.y[:batch_size].to(exp.device),
                 latents=train.latents[:batch_size].to(exp.device) if train.latents is not None else None, raw=raw)


def kf_step(exp, batch: Batch, fused: bool = True):
    """One training step of the experiment's method (forward, backward, optimiser); KF's TSNs fused or not."""
    method = exp.method.train()
    opt = make_optimizer(exp.cfg.optim, method.trainable_parameters())

    def step():
        if hasattr(method, "factors"):
            method.factors.fused = fused
        opt.zero_grad(set_to_none=True)
        method.training_step(batch)["loss"].backward()
        opt.step()

    return step


def plain(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with every forward/backward hook removed: a plain nn.Module."""
    m = copy.deepcopy(module)
    for sub in m.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks, sub._backward_pre_hooks):
            hooks.clear()
    return m


def bound_step(exp, batch: Batch):
    """Plain bound: teacher forward (no grad, no input adapter), CKN forward, every TSN forward on its output, one
    cross-entropy per task summed, ONE backward, one optimiser step."""
    teacher, ckn = plain(exp.method.teacher.net).eval(), plain(exp.method.factors.ckn).train()
    tsns = [plain(t).train() for t in exp.method.factors.tsns]
    opt = plain_optimizer(exp.cfg.optim, [p for m in (ckn, *tsns) for p in m.parameters()])
    x = batch.x
    ys = [torch.randint(0, t.head.out_features, (x.shape[0],), generator=torch.Generator().manual_seed(i)) for i, t in enumerate(tsns)]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher(x)
        z = ckn(x)
        loss = sum(F.cross_entropy(tsn(x, z, True)[0], y) for tsn, y in zip(tsns, ys))
        loss.backward()
        opt.step()

    return step


def build(dataset: str, teacher: Path, num_tasks: int, extra: Sequence[str] = ()):
    _, kf_cfg, tasks = DATASETS[dataset]
    cfg = load_config(configs_root() / kf_cfg, [f"method.teacher={teacher}", tasks(num_tasks), *extra])
    return build_experiment(cfg)


BOUND = "plain bound (teacher fwd + CKN fwd + TSN fwds, one CE each, one backward)"
KF = "kf step (default objective, fused TSNs)"
KF_LOOP = "kf step, TSNs one by one"
KF_ONE_VIEW = "kf step, infomax_weight=0"


def bench_dataset(dataset: str, tmp: Path, tasks: Sequence[int], batch_size: int) -> Dict[str, dict]:
    teacher = train_teacher(DATASETS[dataset][0], tmp / f"teacher-{dataset}")
    out: Dict[str, dict] = {}
    for t in tasks:
        exp = build(dataset, teacher, t)
        no_infomax = build(dataset, teacher, t, ["method.infomax_weight=0"])
        batch = first_batch(exp, batch_size)
        fns = {BOUND: bound_step(exp, batch), KF: kf_step(exp, batch), KF_LOOP: kf_step(exp, batch, fused=False),
               KF_ONE_VIEW: kf_step(no_infomax, batch)}
        res = time_rounds(fns, BOUND)
        exp.method.factors.fused = True  # the label says what the default (fused) candidate ran as
        out[f"{dataset}, T={t}, plain bound"] = report(
            f"KF step vs its plain bound, {dataset}, T={t}, batch {batch_size} ({exp.method.factors.fusion})", res, BOUND,
            f"One KF training step (the method's loss, backward, optimiser) against a stricter bound: the teacher, CKN and TSN "
            f"forwards written as plain nn.Module calls with one CE per task and one backward, without the InfoMax term's "
            f"passes (projectors, or a second CKN view) or the other terms' loss arithmetic, {dataset}, T={t}.")
    return out


STEP_T1 = "kf step, T=1"


def step_flops(exp, batch: Batch) -> float:
    """FLOPs of one KF training step (forward and backward), TSNs one by one."""
    from torch.utils.flop_counter import FlopCounterMode

    step = kf_step(exp, batch, fused=False)
    step()  # built lazily on the first call: count a steady step
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def bench_scaling(dataset: str, tmp: Path, big: int, batch_size: int) -> dict:
    """step(T=big) / step(T=1), timed in one interleaved block, next to the FLOP ratio of the two steps."""
    teacher = tmp / f"teacher-{dataset}"
    one, many = build(dataset, teacher, 1), build(dataset, teacher, big)
    b1, bn = first_batch(one, batch_size), first_batch(many, batch_size)
    flops = step_flops(many, bn) / step_flops(one, b1)
    loop, fused = f"kf step, T={big}, TSNs one by one", f"kf step, T={big}, fused bank"
    res = time_rounds({STEP_T1: kf_step(one, b1), loop: kf_step(many, bn, fused=False), fused: kf_step(many, bn)}, STEP_T1)
    block = report(f"KF step, T={big} vs T=1, {dataset}, batch {batch_size} (FLOP ratio {flops:.2f}x)", res, STEP_T1,
                   f"The KF step at T={big} against the same step at T=1 ({dataset}), next to the FLOP ratio of the two steps.")
    r = res[fused]["ratio"]
    block["flop ratio"] = flops
    block["growth / FLOP growth"] = {"median": r["median"] / flops, "iqr": [q / flops for q in r["iqr"]], "n": r["n"]}
    block["big T"] = big
    return block


def bench_bank(num_tasks: int, batch_size: int) -> dict:
    """The digits TSNs alone (forward + backward): task by task, torch.func.vmap over stacked parameters, the fused bank."""
    from torch.func import functional_call, stack_module_state, vmap

    from kbricks.models import create_model
    from kbricks.models.factorized import FactorNetworks, TaskSpecificNetwork

    make = lambda: create_model("small_cnn", num_classes=0, in_channels=1, image_size=8, widths=[16, 32])  # noqa: E731
    tsns = [TaskSpecificNetwork(make(), 8, 64, 6, "concat") for _ in range(num_tasks)]
    factors = FactorNetworks(make(), tsns).train()
    x, z = torch.randn(batch_size, 1, 8, 8), torch.randn(batch_size, 64)
    params, buffers = stack_module_state(tsns)
    skeleton = TaskSpecificNetwork(make(), 8, 64, 6, "concat").to("meta")

    def one(p, b, x, z):
        return functional_call(skeleton, (p, b), (x, z, False))

    def run(fused: bool):
        def step():
            factors.fused = fused
            sum(t.sum() for col in factors.tsn_outputs(x, z, False) for t in col).backward()
        return step

    def vmapped():
        sum(t.sum() for t in vmap(one, in_dims=(0, 0, None, None))(params, buffers, x, z)).backward()

    res = time_rounds({"task by task": run(False), "torch.func.vmap": vmapped, "fused bank (kbricks)": run(True)}, "task by task")
    return report(f"{num_tasks} digits TSNs alone, forward + backward, batch {batch_size}", res, "task by task",
                  f"Forward + backward of {num_tasks} digits TSNs alone: kbricks' fused bank and torch.func.vmap against a plain loop over the TSNs.")


def bench_optimizer(tmp: Path, num_tasks: int) -> dict:
    """One SGD update over the digits KF parameters: torch's per-parameter loop, foreach, and kbricks' choice."""
    exp = build("digits", tmp / "teacher-digits", num_tasks)
    params = list(exp.method.trainable_parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    fused = make_optimizer(exp.cfg.optim, params)
    o = exp.cfg.optim
    kw = dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    base = "per-parameter loop (torch's CPU default)"
    res = time_rounds({base: torch.optim.SGD(params, **kw).step, "foreach": torch.optim.SGD(params, foreach=True, **kw).step,
                       f"kbricks (fused={fused.param_groups[0].get('fused')})": fused.step}, base, inner=20)
    return report(f"SGD update, digits KF parameters at T={num_tasks} ({len(params)} tensors)", res, base,
                  f"One SGD update of the {len(params)} digits KF parameter tensors: kbricks' optimiser against torch.optim.SGD's default.")


def main(datasets: Sequence[str] = ("digits", "dsprites")):
    torch.manual_seed(0)
    tasks, big, bs = ((1, 2), 2, 16) if quick() else (TASKS, 8, 64)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in datasets:
            out.update(bench_dataset(d, Path(tmp), tasks, bs))
            out[f"{d}, growth T=1 to {big}"] = bench_scaling(d, Path(tmp), big, bs)
        if "digits" in datasets:
            out[f"SGD update, T={big} parameters"] = bench_optimizer(Path(tmp), big)
    out[f"TSN bank alone, T={big}"] = bench_bank(big, bs)
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or ("digits", "dsprites"))
