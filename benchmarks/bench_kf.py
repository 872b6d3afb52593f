"""KF training step vs the cost it is built on: teacher forward + a same-size student forward/backward.

The KF step runs the teacher, the CKN on two views (InfoNCE), and every TSN; the baseline is one KD step
(teacher forward under no_grad + student forward/backward + optimiser step) with a student of about the same
number of parameters as CKN + TSNs. Both are timed interleaved in one process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import report, time_interleaved

from kbricks import load_config
from kbricks.engine.experiment import build_experiment
from kbricks.engine.trainer import run_training
from kbricks.methods import Batch
from kbricks.models import count_parameters
from kbricks.studies import configs_root


def step_fn(exp, batch_size: int):
    train = exp.data.train
    raw = train.x[:batch_size]
    batch = Batch(x=exp.transform(raw, train=True), y=train.y[:batch_size],
                  latents=train.latents[:batch_size] if train.latents is not None else None, raw=raw)
    opt = torch.optim.SGD([p for p in exp.method.parameters() if p.requires_grad], lr=1e-3)
    exp.method.train()

    def step():
        opt.zero_grad(set_to_none=True)
        exp.method.training_step(batch)["loss"].backward()
        opt.step()

    return step


def bench(name: str, teacher_cfg: str, kf_cfg: str, kd_cfg: str, batch_size: int = 64):
    root = configs_root()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        # timing does not depend on the teacher's quality: one short epoch is enough to get a real teacher run
        run_training(load_config(root / teacher_cfg, ["train.epochs=1", "train.progress=off", "train.plots=false", "train.max_steps_per_epoch=2"]), teacher)
        over = [f"method.teacher={teacher}"]
        kf = build_experiment(load_config(root / kf_cfg, over))
        kd = build_experiment(load_config(root / kd_cfg, over))
        n_kf = count_parameters(kf.method.export_module())
        n_kd = count_parameters(kd.method.export_module())
        times = time_interleaved({"kd step (teacher fwd + student fwd/bwd)": step_fn(kd, batch_size), "kf step (IMB)": step_fn(kf, batch_size)})
    print(f"  params: KF (CKN + TSNs) {n_kf:,} | KD student {n_kd:,}")
    return report(f"KF training step, {name}, batch {batch_size}", times, "kd step (teacher fwd + student fwd/bwd)")


def main():
    torch.manual_seed(0)
    out = {}
    out["digits"] = bench("digits 8x8, 2 tasks", "teacher/digits_cnn.yaml", "kf/digits.yaml", "kd/digits_student.yaml")
    out["dsprites"] = bench("dSprites 32x32, 3 tasks", "teacher/dsprites_multihead.yaml", "kf/dsprites.yaml", "kd/dsprites_student.yaml")
    return out


if __name__ == "__main__":
    main()
