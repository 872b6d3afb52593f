"""The continual-learning loop: learn tasks one after another, fill the accuracy matrix, infer missing task ids.

Run directory: config.yaml, env.json, accuracy_matrix.csv, metrics.jsonl (one row per task), results.json,
plots/{accuracy_matrix,accuracy_curves}.png, ckpt/last.pt (after every task: resume at task granularity).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import torch
from pydantic import Field, ValidationError

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import Strict, apply_overrides, format_validation_error, read_yaml
from ..errors import CheckpointError, ConfigError
from ..models.masked import MASKED_MODELS, SupermaskNet
from ..registry import check_kwargs
from ..utils import derive_seed, environment_info, seed_everything
from .inference import candidate_masks, infer_task
from .methods import CL_METHODS, ContinualMethod
from .metrics import cl_metrics
from .scenarios import SCENARIOS, TaskData, build_scenario


class ScenarioConfig(Strict):
    name: str = "permuted"
    num_tasks: int = Field(5, ge=1)
    dataset: str = "mnist5k"
    seed: int = 0
    degrees_per_task: Optional[float] = Field(None, description="rotated only: angle step (default 360 / num_tasks)")

    def kwargs(self) -> Dict[str, Any]:
        extra = {"degrees_per_task": self.degrees_per_task} if self.degrees_per_task is not None else {}
        return {"num_tasks": self.num_tasks, "dataset": self.dataset, "seed": self.seed, **extra}


class CLModelConfig(Strict):
    name: str = "masked_mlp"
    kwargs: Dict[str, Any] = Field(default_factory=dict)


class CLMethodConfig(Strict):
    name: Literal["supsup", "impresslearn"] = "supsup"
    params: Dict[str, Any] = Field(default_factory=dict)


class CLTrainConfig(Strict):
    steps_per_task: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0, description="Adam learning rate for mask scores")
    alpha_lr: float = Field(0.05, gt=0, description="Adam learning rate for ImpressLearn coefficients")
    alpha_steps: Optional[int] = Field(None, ge=1, description="defaults to steps_per_task")
    eval_batch_size: int = Field(1000, ge=1)


class InferenceConfig(Strict):
    images: List[int] = Field(default_factory=lambda: [1, 16], description="images per inference batch")
    trials_per_task: int = Field(20, ge=1)
    methods: List[Literal["one_shot", "binary"]] = Field(default_factory=lambda: ["one_shot", "binary"])


class ContinualConfig(Strict):
    name: str = "continual"
    seed: int = 0
    out_dir: str = "runs"
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    model: CLModelConfig = Field(default_factory=CLModelConfig)
    method: CLMethodConfig = Field(default_factory=CLMethodConfig)
    train: CLTrainConfig = Field(default_factory=CLTrainConfig)
    inference: Optional[InferenceConfig] = Field(default_factory=InferenceConfig)
    plots: bool = True


def load_continual_config(path, overrides: Sequence[str] = ()) -> ContinualConfig:
    data = apply_overrides(read_yaml(Path(path)), overrides)
    try:
        cfg = ContinualConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    check_kwargs(SCENARIOS.get(cfg.scenario.name), cfg.scenario.kwargs(), f"scenario {cfg.scenario.name!r}")
    check_kwargs(MASKED_MODELS.get(cfg.model.name), {"num_classes": 1, "in_channels": 1, "image_size": 1, **cfg.model.kwargs}, f"model {cfg.model.name!r}")
    method_params(cfg)
    return cfg


def method_params(cfg: ContinualConfig):
    cls = CL_METHODS.get(cfg.method.name)
    try:
        return cls.Config.model_validate(cfg.method.params)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix="method.params")) from None


def build(cfg: ContinualConfig):
    seed_everything(cfg.seed)
    tasks = build_scenario(cfg.scenario.name, **cfg.scenario.kwargs())
    x = tasks[0].train.x
    kwargs = {"seed": cfg.seed, **cfg.model.kwargs}
    net: SupermaskNet = MASKED_MODELS.create(cfg.model.name, num_classes=max(t.num_classes for t in tasks), in_channels=x.shape[1], image_size=x.shape[-1], **kwargs)
    method: ContinualMethod = CL_METHODS.get(cfg.method.name)(method_params(cfg), net, cfg.seed)
    return tasks, net, method


def make_fit(data: TaskData, batch_size: int, seed: int, t: int):
    """An optimisation loop over one task's training data (Adam, fixed steps, seeded batches)."""
    def fit(params, loss_fn, lr: float, steps: int) -> None:
        g = torch.Generator().manual_seed(derive_seed(seed, t, 3))
        opt = torch.optim.Adam(params, lr=lr)
        n = len(data.train)
        order = torch.randperm(n, generator=g)
        pos = 0
        for _ in range(steps):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            losses = loss_fn(data.train.x[idx], data.train.y[idx])
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            if not torch.isfinite(losses["loss"]):
                from ..errors import TrainingDiverged

                raise TrainingDiverged(f"loss became {losses['loss'].item()} while learning task {t}")
    return fit


@torch.no_grad()
def predict_task(net: SupermaskNet, method: ContinualMethod, t: int, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Task t's logits: its combined mask is computed once, then every batch is one dense forward."""
    net.use_cached(method.task_alphas(t))
    net.set_bn_slot(t)
    net.eval()
    out = torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)])
    net.release()
    return out


def accuracy_on(net, method, t: int, data: TaskData, batch: int) -> float:
    logits = predict_task(net, method, t, data.test.x, batch)[:, : data.num_classes]
    return (logits.argmax(1) == data.test.y).float().mean().item()


def evaluate_inference(net, method, tasks: List[TaskData], cfg: InferenceConfig, seed: int) -> Dict[str, float]:
    """Task-id accuracy and the accuracy of classifying with the inferred id, per batch size and method."""
    cands = candidate_masks(net, [method.task_alphas(t) for t in range(len(tasks))])
    out: Dict[str, float] = {}
    g = torch.Generator().manual_seed(derive_seed(seed, 99))
    for m in cfg.methods:
        for n_img in cfg.images:
            right_task = right_label = total = 0
            for t, data in enumerate(tasks):
                for _ in range(cfg.trials_per_task):
                    idx = torch.randint(0, len(data.test), (n_img,), generator=g)
                    x, y = data.test.x[idx], data.test.y[idx]
                    guess = infer_task(net, x, cands, m)
                    right_task += int(guess == t)
                    pred = predict_task(net, method, guess, x, n_img)[:, : data.num_classes].argmax(1)
                    right_label += int((pred == y).sum()) if guess == t else 0  # GNu: a wrong task is a wrong answer
                    total += n_img
            trials = len(tasks) * cfg.trials_per_task
            out[f"task_inference/{m}/{n_img}img"] = right_task / trials
            out[f"gn_acc/{m}/{n_img}img"] = right_label / total
    return out


def write_matrix(path: Path, R: List[List[Optional[float]]], names: List[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["after_task"] + names)
        for i, row in enumerate(R):
            w.writerow([names[i]] + ["" if v is None else f"{v:.6f}" for v in row])


def run_continual(cfg: ContinualConfig, run_dir: Path, resume: bool = False, stop_after: Optional[int] = None) -> Dict[str, Any]:
    run_dir = Path(run_dir)
    ckpt = run_dir / "ckpt" / "last.pt"
    if ckpt.exists() and not resume:
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (run_dir / "env.json").write_text(json.dumps(environment_info(torch.device("cpu"), 1), indent=2))
    tasks, net, method = build(cfg)
    T = len(tasks)
    names = [t.name for t in tasks]
    R: List[List[Optional[float]]] = []
    seconds: List[float] = []
    start = 0
    untrained = None
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        if state.get("config") != cfg.model_dump(mode="json"):
            raise CheckpointError("cannot resume: the checkpoint was written with a different config")
        net.load_masks_state(state["net"])
        method.load(state["method"])
        R, untrained, seconds, start = state["R"], state["untrained"], state["seconds"], state["next_task"]
    if untrained is None:
        untrained = [1.0 / t.num_classes for t in tasks]  # chance level per task, reported for reference
    for t in range(start, T):
        t0 = time.time()
        fit = make_fit(tasks[t], cfg.train.batch_size, cfg.seed, t)
        method.learn_task(t, fit, cfg.train.lr, cfg.train.steps_per_task, alpha_lr=cfg.train.alpha_lr, alpha_steps=cfg.train.alpha_steps)
        seconds.append(time.time() - t0)
        R.append([accuracy_on(net, method, j, tasks[j], cfg.train.eval_batch_size) if j <= t else None for j in range(T)])
        row = {"task": t + 1, "name": names[t], "acc_current": R[t][t], "avg_acc_seen": sum(R[t][: t + 1]) / (t + 1), "seconds": seconds[-1]}
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{cfg.name}] task {t + 1}/{T} {names[t]}: acc {R[t][t]:.4f}, mean over seen {row['avg_acc_seen']:.4f}", flush=True)
        save_checkpoint({"net": net.state_dict(), "method": method.state(), "R": R, "untrained": untrained, "seconds": seconds,
                         "next_task": t + 1, "config": cfg.model_dump(mode="json")}, ckpt)
        write_matrix(run_dir / "accuracy_matrix.csv", R, names)
        if stop_after is not None and t + 1 >= stop_after:
            return {"stopped_after": t + 1}
    full = [[v for v in row] for row in R]
    metrics = cl_metrics(full)  # forward transfer is undefined here: a task has no mask before it is learned
    storage = method.per_task_storage()
    result: Dict[str, Any] = {
        "name": cfg.name, "seed": cfg.seed, "method": method.name, "tasks": names, "accuracy_matrix": full,
        **metrics, "final_accs": full[-1], "params_per_task": storage["entries"], "bytes_per_task": storage["bytes"],
        "per_task_state": storage["what"], "weights_per_mask": net.weights_per_mask(), "stored_masks": net.num_stored(),
        "train_seconds": sum(seconds), "chance": untrained,
    }
    if cfg.inference is not None and T > 1:
        from ..models.masked import TaskBatchNorm

        if any(isinstance(m, TaskBatchNorm) for m in net.modules()):
            result["task_inference"] = "skipped: per-task BN statistics need the task id"
        else:
            result.update(evaluate_inference(net, method, tasks, cfg.inference, cfg.seed))
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    if cfg.plots:
        plot_run(run_dir, full, names, cfg.name)
    return result


def plot_run(run_dir: Path, R: List[List[float]], names: List[str], title: str) -> None:
    import numpy as np

    from ..plots import _pyplot, plot_matrix

    m = np.array([[np.nan if v is None else 100 * v for v in row] for row in R])
    plot_matrix(m, run_dir / "plots" / "accuracy_matrix.png", title=f"{title}: accuracy (%)", xlabel="evaluated task", ylabel="after learning task")
    try:
        plt = _pyplot()
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    T = len(names)
    for j in range(T):
        ax.plot(range(j + 1, T + 1), m[j:, j], marker="o", label=names[j])
    ax.plot(range(1, T + 1), [np.nanmean(m[i, : i + 1]) for i in range(T)], "k--", label="mean of seen tasks")
    ax.set_xlabel("tasks learned"), ax.set_ylabel("test accuracy (%)"), ax.set_title(title), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "accuracy_curves.png", dpi=110)
    plt.close(fig)


