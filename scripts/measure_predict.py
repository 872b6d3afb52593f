"""Measure ContinualRun.predict(x) (task-free prediction) against predict_task(x, true task) on a small SupSup run.

    python scripts/measure_predict.py                      # PermutedMNIST-5k, 5 tasks, quick budget (2 epochs per task)
    python scripts/measure_predict.py --tasks 5 --epochs 2 --trials 100 --out /tmp/predict.json

The run: configs/continual/supsup_permuted.yaml (the official SupSup recipe) with ``data.scenario.num_tasks``,
``train.epochs`` overridden. For every task and batch size (1 and 16 images), ``--trials`` random test batches
(the same batches as the run's own inference evaluation, ``kbricks.engine.continual.trial_batch``) go through
``predict(x, infer=rule)``; printed per rule and batch size: how often the inferred task is the true one, the label
accuracy of ``predict`` (GNs: classified with whatever task was inferred), the label accuracy of
``predict_task(x, true task)`` on the same batches (the task id given), and how often ``predict``'s labels equal
``predict_task``'s. Numbers go to docs/api.md ("Prediction without a task id").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rules", default="one_shot,binary")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from kbricks import ContinualRun, load_config
    from kbricks.engine.continual import load_continual_run, trial_batch
    from kbricks.engine.run import run_continual

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/continual/supsup_permuted.yaml",
                          [f"data.scenario.num_tasks={args.tasks}", f"train.epochs={args.epochs}", f"seed={args.seed}",
                           "inference=null", "train.progress=off", "train.plots=false"])
        summary = run_continual(cfg, Path(tmp) / "run")
        exp = load_continual_run(Path(tmp) / "run")
        run = ContinualRun(Path(tmp) / "run", summary, exp.method, exp.method, exp.transform, exp.device)
        train_s = time.time() - t0
        rows = []
        for rule in args.rules.split(","):
            for n_img in (1, 16):
                task_right = labels_right = given_right = agree = total = 0
                t1 = time.perf_counter()
                for t, data in enumerate(exp.scenario):
                    for trial in range(args.trials):
                        idx = trial_batch(data, args.seed, n_img, t, trial)
                        x, y = data.test.x[idx], data.test.y[idx]
                        out = run.predict(x, infer=rule)
                        given = run.predict_task(x, t)[:, : data.num_classes].argmax(1)
                        task_right += int(out.tasks[0] == t)
                        labels_right += int((out.labels == y).sum())
                        given_right += int((given == y).sum())
                        agree += int((out.labels == given).sum())
                        total += n_img
                count = len(exp.scenario) * args.trials
                rows.append({"rule": rule, "images": n_img, "task_inference": task_right / count, "label_acc_predict": labels_right / total,
                             "label_acc_predict_task": given_right / total, "labels_equal_predict_task": agree / total,
                             "ms_per_call": 1e3 * (time.perf_counter() - t1) / count})
    result = {"scenario": f"PermutedMNIST-5k, {args.tasks} tasks", "epochs_per_task": args.epochs, "seed": args.seed,
              "trials_per_task": args.trials, "gg_avg_acc": summary["avg_acc"], "train_seconds": round(train_s, 1),
              "total_seconds": round(time.time() - t0, 1), "rows": rows}
    print(f"{result['scenario']}, {args.epochs} epochs per task, seed {args.seed}: GG accuracy (task id given, full test sets) "
          f"{100 * summary['avg_acc']:.2f}%; {args.trials} batches per task and size; {result['total_seconds']:.0f} s in all")
    print("| rule | images per batch | task inferred right % | labels right, predict(x) % | labels right, predict_task(x, true task) % "
          "| predict labels = predict_task labels % | ms per trial (both calls) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['images']} | {100 * r['task_inference']:.1f} | {100 * r['label_acc_predict']:.2f} | "
              f"{100 * r['label_acc_predict_task']:.2f} | {100 * r['labels_equal_predict_task']:.2f} | {r['ms_per_call']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
