"""Bring your own teacher: a digits classifier written and trained in plain PyTorch (its own class, its own loop,
its own train/test split), factorized by kbricks into two class-partition bricks, assembled, scored against the
teacher on the same test split, and exported to TorchScript.

    python examples/byo_teacher_kf.py                 # ~2 min on 2 CPU cores
    python examples/byo_teacher_kf.py --quick         # a smoke run (CI)
    python examples/byo_teacher_kf.py --cli           # also the same factorization through the command line

The teacher reaches kbricks in two forms: the nn.Module object (Python API) and a TorchScript file given on the
command line as method.teacher, with its input convention stated (it was trained on standardised inputs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import kbricks


class DigitsNet(nn.Module):
    """The user's own network: no `features`, nested containers, a classifier head named `classify`."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "stem": nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
            "body": nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2)),
        })
        self.classify = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classify(self.blocks["body"](self.blocks["stem"](x)))


def user_split(seed: int = 123):
    """The user's data and split: images on sklearn's 0..16 scale, 75 / 25 split of their own."""
    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))
    cut = int(0.75 * len(idx))
    x = d.images.astype(np.float32)[:, None]  # [N, 1, 8, 8], values 0..16
    return (x[idx[:cut]], d.target[idx[:cut]]), (x[idx[cut:]], d.target[idx[cut:]])


def train_teacher(x, y, mean, std, epochs: int, seed: int = 0) -> nn.Module:
    """The user's own training loop, on inputs standardised with the user's own statistics."""
    torch.manual_seed(seed)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = (torch.from_numpy(x) - mean) / std, torch.from_numpy(y).long()
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    ap.add_argument("--cli", action="store_true", help="also factorize the TorchScript teacher through the command line")
    ap.add_argument("--out", default="runs/examples/byo_teacher_kf")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_epochs, kf_epochs = (1, 1) if args.quick else (30, 40)

    (x_tr, y_tr), (x_te, y_te) = user_split()
    mean, std = float(x_tr.mean()), float(x_tr.std())
    teacher = train_teacher(x_tr, y_tr, mean, std, teacher_epochs)
    teacher_acc = kbricks.accuracy(lambda b: teacher((b - mean) / std), x_te, y_te)
    print(f"teacher (plain PyTorch) test accuracy: {teacher_acc:.4f}")

    # kbricks reads the data on a [0, 1] scale: divide by 16 and say how the teacher wants its inputs (nothing is
    # guessed): it takes (x16 - mean) / std = (x01 - mean/16) / (std/16).
    x01_tr, x01_te = x_tr / 16.0, x_te / 16.0
    convention = {"mean": [mean / 16.0], "std": [std / 16.0]}
    fac = kbricks.factorize(
        teacher, (x01_tr, y_tr), test=(x01_te, y_te), tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
        teacher_normalize=convention, augment={"crop_padding": 1}, epochs=kf_epochs, lr=0.05, seed=args.seed,
        run_dir=out / f"api-seed{args.seed}", overwrite=True,
        overrides=["train.max_steps_per_epoch=2", "train.plots=false"] if args.quick else [],
    )
    assembled_acc = fac.assembled_accuracy(x01_te, y_te)
    print(f"bricks: {', '.join(str(p) for p in fac.bricks.values())}")
    print(f"assembled from 2 bricks (Python API, nn.Module teacher): {assembled_acc:.4f}  (teacher {teacher_acc:.4f})")
    # deployable output: the assembled network takes the same raw inputs as above (it carries the run's input
    # normalisation); exported to TorchScript, it is checked against eager PyTorch before the file is written
    net = fac.assemble()
    exported = out / f"assembled-seed{args.seed}.pt"
    kbricks.export(net, exported, format="torchscript", example_input=torch.from_numpy(x01_te[:16]), overwrite=True)
    exported_acc = kbricks.accuracy(torch.jit.load(str(exported)), x01_te, y_te)
    print(f"exported {exported}: accuracy {exported_acc:.4f}")
    result = {"teacher_acc": teacher_acc, "api": {"assembled_acc": assembled_acc, "exported_acc": exported_acc, "run_dir": str(fac.run_dir)}}

    if args.cli:
        # the same teacher as a TorchScript file, the same data as an npz on its own 0..16 scale, on the command line
        from kbricks.cli import main as kbricks_cli

        torch.jit.save(torch.jit.script(teacher), out / "teacher.pt")
        np.savez(out / "digits.npz", x_train=x_tr[:, 0], y_train=y_tr, x_test=x_te[:, 0], y_test=y_te)
        teacher_spec = json.dumps({"path": str(out / "teacher.pt"), "normalize": convention})
        cli_args = ["train", str(Path(__file__).with_name("byo_teacher_kf.yaml")), "--run-dir", str(out / f"cli-seed{args.seed}"),
                    "--overwrite", "-o", f"data.root={out / 'digits.npz'}", "-o", f"method.teacher={teacher_spec}",
                    "-o", f"seed={args.seed}", "-o", f"train.epochs={kf_epochs}"]
        if args.quick:
            cli_args += ["-o", "train.max_steps_per_epoch=2"]
        print("kbricks " + " ".join(cli_args))
        assert kbricks_cli(cli_args) == 0
        bricks = out / f"cli-seed{args.seed}" / "bricks"
        net = kbricks.assemble(bricks / "ckn.json", [bricks / "tsn-classes_0-1-2-3-4.json", bricks / "tsn-classes_5-6-7-8-9.json"])
        cli_acc = kbricks.accuracy(net, x01_te, y_te)
        print(f"assembled from 2 bricks (CLI, TorchScript teacher): {cli_acc:.4f}  (teacher {teacher_acc:.4f})")
        result["cli"] = {"assembled_acc": cli_acc, "run_dir": str(out / f"cli-seed{args.seed}")}
    (out / f"result-seed{args.seed}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
