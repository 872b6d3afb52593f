"""Bring your own backbone: SupSup and ImpressLearn on a network class written in plain PyTorch.

kbricks supermasks a copy of it (every nn.Linear / nn.Conv2d becomes a masked layer over frozen signed constants,
every BatchNorm keeps statistics per task) and learns Split digits (5 tasks of 2 classes) one task after another:
SupSup stores one binary mask per task, ImpressLearn 3 masks in all plus 3 coefficients per layer and task.

    python examples/byo_continual_backbone.py           # ~2 min on 2 CPU cores
    python examples/byo_continual_backbone.py --quick   # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch import nn

import kbricks


class MyBackbone(nn.Module):
    """The user's network. kbricks passes ``num_classes`` (the largest task's class count) to the class."""

    def __init__(self, num_classes: int = 2, width: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, affine=False), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width, affine=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes, bias=False)

    def forward(self, x):
        return self.classifier(self.trunk(x))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/examples/byo_continual_backbone")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    quick = ["train.max_steps_per_epoch=2", "train.plots=false"] if args.quick else ["train.plots=false"]
    epochs, num_tasks = (1, 2) if args.quick else (30, 5)

    result = {}
    impressions = 2 if args.quick else 3
    for method, options in (("supsup", {}), ("impresslearn", {"impressions": impressions, "source": "heterogeneous"})):
        run = kbricks.learn_continually(MyBackbone, "digits", method=method, scenario="split", num_tasks=num_tasks, epochs=epochs,
                                        options=options, seed=args.seed, run_dir=out / f"{method}-seed{args.seed}", overwrite=True,
                                        overrides=quick)
        matrix = run.summary["accuracy_matrix"]
        print(f"{method}: final accuracy per task {[round(a, 3) for a in matrix[-1]]}; average {run.summary['avg_acc']:.4f}; "
              f"forgetting {run.summary.get('forgetting', 0.0):.4f}; {run.summary['bytes_per_task']:.0f} bytes per task")
        result[method] = {k: run.summary[k] for k in ("avg_acc", "accuracy_matrix", "bytes_per_task")}
    (out / f"result-seed{args.seed}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
