"""Bring your own source networks: SSKT on few-label digits from two networks written and trained in plain PyTorch
on other data, with other label spaces and another resolution:

* an MNIST classifier on 28x28 images (10 classes of another domain): the 8x8 digits are resized for it;
* a shape classifier on 8x8 renders of dSprites (6 classes: shape x size, a foreign label space).

Each source is frozen and gets an auxiliary head on the target network that learns its softened predictions;
a network trained from scratch on the same 100 labels is the baseline.

    python examples/byo_sskt_sources.py           # ~3 min on 2 CPU cores
    python examples/byo_sskt_sources.py --quick   # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kbricks
from kbricks.data import load_dataset


class MnistNet(nn.Module):
    """The user's 28x28 MNIST classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.fc(self.conv(x))


class ShapesNet(nn.Module):
    """The user's 8x8 shape classifier (6 classes)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 6))

    def forward(self, x):
        return self.net(x)


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    """The user's own loop."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/examples/byo_sskt_sources")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    src_epochs, epochs = (1, 1) if args.quick else (8, 150)

    mnist, shapes = load_dataset("mnist5k"), load_dataset("shapes8")  # the user's source data (in [0, 1])
    n = 256 if args.quick else len(mnist.train)
    mnist_net = fit(MnistNet(), mnist.train.x[:n], mnist.train.y[:n], src_epochs)
    shapes_net = fit(ShapesNet(), shapes.train.x[:n], shapes.train.y[:n], src_epochs)
    print(f"sources: MNIST 28x28 {kbricks.accuracy(mnist_net, mnist.test.x, mnist.test.y):.3f}, "
          f"shapes 8x8 {kbricks.accuracy(shapes_net, shapes.test.x, shapes.test.y):.3f}")

    target = {"name": "digits", "kwargs": {"labels_per_class": 10}}  # 100 labelled digits, the rest is the test set
    student = {"name": "mlp", "kwargs": {"hidden": [32]}} if args.quick else {"name": "resnet8", "kwargs": {"width": 16}}
    common = dict(student=student, augment={"crop_padding": 1}, epochs=epochs, batch_size=32,
                  lr=0.05, seed=args.seed, overwrite=True, overrides=["optim.nesterov=true", "train.eval_every=50", "train.plots=false"]
                  + (["train.max_steps_per_epoch=2"] if args.quick else []))
    # each source states how the target images become its input: the MNIST net takes 28x28 images
    sources = [{"path": mnist_net, "input": {"size": 28}}, shapes_net]
    sskt = kbricks.distill(target, method="sskt", sources=sources, options={"alpha": 0.1, "temperature": 3.0},
                           run_dir=out / f"sskt-seed{args.seed}", **common)
    scratch = kbricks.distill(target, method="supervised", run_dir=out / f"scratch-seed{args.seed}", **common)
    result = {"sskt": sskt.summary["final"]["test/acc"], "scratch": scratch.summary["final"]["test/acc"]}
    print(f"few-label digits: SSKT {result['sskt']:.4f} vs scratch {result['scratch']:.4f} (run dirs {sskt.run_dir}, {scratch.run_dir})")
    (out / f"result-seed{args.seed}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
