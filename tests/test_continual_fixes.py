"""Continual strategies: the ER buffer stays class-balanced when it shrinks and refuses a buffer too small for the
scenario; every strategy's training step adds its regulariser and its plugins' terms (a supermask strategy refuses a
replay plugin); an ImpressLearn recipe refuses a field the config sets otherwise; task-free predictions carry the
dataset's class ids; the exported model of a continual run carries no plugin state."""

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from kbricks import ContinualRun, build_config
from kbricks.continual.plugins import ContinualPlugin
from kbricks.continual.replay import ReplayPlugin, balanced_sample
from kbricks.core.checkpoint import load_checkpoint
from kbricks.core.rundir import RunDirectory
from kbricks.engine.continual import ContinualTrainer
from kbricks.engine.experiment import build_experiment
from kbricks.errors import ConfigError
from kbricks.methods.base import Batch, MethodContext


def config(method, scenario="split", tasks=5, model=None, **method_over):
    return build_config({
        "name": method, "data": {"name": "digits", "scenario": {"name": scenario, "num_tasks": tasks}},
        "model": model or {"name": "masked_mlp", "kwargs": {"hidden": [32]}}, "method": {"name": method, **method_over},
        "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"epochs": 2, "batch_size": 64, "progress": "off", "plots": False}, "inference": None})


def fit(cfg, path):
    exp = build_experiment(cfg)
    summary = ContinualTrainer(exp, RunDirectory.open(path, "runs", "x", 0, resume=False)).fit()
    return exp, summary


# ---- 1, 2: the ER buffer -----------------------------------------------------------------------------------------

def fake_strategy(tasks, per_class=30, seed=0):
    """Two-class tasks of ``per_class`` samples each, their x the sample's index (to trace what the buffer keeps)."""
    scenario = []
    for _ in range(tasks):
        y = torch.arange(2).repeat_interleave(per_class)
        scenario.append(SimpleNamespace(train=SimpleNamespace(x=torch.arange(len(y)).float(), y=y)))
    return SimpleNamespace(scenario=scenario, generator=lambda *parts: torch.Generator().manual_seed(seed * 1000 + sum(parts) * 7 + len(parts)))


@pytest.mark.parametrize("seed", range(6))
def test_a_shrinking_er_buffer_keeps_every_older_task_class_balanced(seed):
    """buffer_total=10 over 5 two-class tasks: each task ends with 2 samples, one of each class (a random cut of a
    shuffled draw kept a single class in about half of the tasks)."""
    s, plugin = fake_strategy(5, seed=seed), ReplayPlugin(None, 10, None)
    for t in range(5):
        plugin.after_task(s, t)
        keep = 10 // (t + 1)
        for j in range(t + 1):
            counts = torch.bincount(plugin.y[plugin.task == j], minlength=2)
            assert counts.sum() == keep and (counts.max() - counts.min()) <= 1, (t, j, counts.tolist())


def test_balanced_sample_orders_classes_round_robin_and_takes_everything_when_asked_for_more():
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    idx = balanced_sample(y, 100, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == list(range(10))
    assert y[idx].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 0]  # every prefix as equal as the classes allow
    assert balanced_sample(y, 0, torch.Generator()).shape == (0,)


def test_er_refuses_a_total_buffer_smaller_than_the_task_count_in_one_line():
    with pytest.raises(ConfigError, match=r"buffer_total=3 .* 5 tasks.*buffer_total >= 5") as e:
        build_experiment(config("er", buffer_per_task=None, buffer_total=3))
    assert "\n" not in str(e.value)
    assert build_experiment(config("er", buffer_per_task=None, buffer_total=5)).method.plugins[0].total == 5


# ---- 3: one rule for the training step -----------------------------------------------------------------------------

class ConstantTerm(ContinualPlugin):
    name = "const"

    def loss(self, strategy, x, out, tasks):
        return out.sum() * 0 + 2.0


def rebuilt(cls, exp):
    ctx = MethodContext(cfg=exp.cfg, train=exp.scenario[0].train, tasks=[], device=exp.device, transform=exp.transform, scenario=exp.scenario)
    return cls(exp.method.params, ctx)


def one_step(strategy, exp):
    stage = strategy.stages(0)[0]
    strategy.before_task(0)
    strategy.begin_stage(stage)
    data = exp.scenario[0].train
    return strategy.training_step(Batch(exp.transform(data.x[:16], train=False), data.y[:16]))


def test_a_dense_strategy_adds_its_regulariser_and_a_supermask_strategy_its_plugins_terms():
    from kbricks.continual.finetune import Finetune
    from kbricks.continual.supsup import SupSup

    class Pulled(Finetune):
        def regulariser(self):
            return torch.tensor(3.0)

    exp = build_experiment(config("finetune", tasks=2))
    losses = one_step(rebuilt(Pulled, exp), exp)
    assert losses["reg"].item() == 3.0 and losses["loss"].item() == pytest.approx(losses["ce"].item() + 3.0)

    class WithTerm(SupSup):
        def make_plugins(self):
            return [ConstantTerm()]

    exp = build_experiment(config("supsup", tasks=2, density=0.5))
    losses = one_step(rebuilt(WithTerm, exp), exp)
    assert losses["const"].item() == 2.0 and losses["loss"].item() == pytest.approx(losses["ce"].item() + 2.0)
    assert losses["loss"].requires_grad


def test_a_supermask_strategy_refuses_a_replay_plugin_in_one_line():
    from kbricks.continual.supsup import SupSup

    class Replaying(SupSup):
        def make_plugins(self):
            return [ReplayPlugin(10, None, None)]

    exp = build_experiment(config("supsup", tasks=2, density=0.5))
    with pytest.raises(ConfigError, match="plugin 'replay' replays samples.*frozen.*drop the plugin") as e:
        rebuilt(Replaying, exp)
    assert "\n" not in str(e.value)


# ---- 4: ImpressLearn recipes -------------------------------------------------------------------------------------

def test_a_recipe_refuses_a_field_the_config_sets_to_another_value():
    with pytest.raises(ConfigError, match=r"recipe authors_cifar sets alpha_init='uniform' but the config sets alpha_init='best'; "
                                          r"drop alpha_init from the config or drop the recipe") as e:
        config("impresslearn", "permuted", 2, recipe="authors_cifar", alpha_init="best")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="sets density=0.25 but the config sets density=0.5"):
        config("impresslearn", "permuted", 2, recipe="authors_mnist", density=0.5)
    with pytest.raises(ConfigError, match="alpha_optim"):
        config("impresslearn", "permuted", 2, recipe="authors_cifar", alpha_optim={"name": "adam", "lr": 0.5})
    # the recipe's own values (e.g. a recorded config read back) and fields it does not name are accepted
    p = build_experiment(config("impresslearn", "permuted", 2, recipe="authors_mnist", density=0.25, reg=0, alpha_steps=938,
                                select_images=64, impressions=2)).method.params
    assert (p.density, p.select_images, p.alpha_init) == (0.25, 64, "uniform")


def test_recipe_overrides_agree_with_a_config_file_that_sets_the_recipes_fields():
    from kbricks.continual.impresslearn import recipe_overrides

    data = {"name": "il", "data": {"name": "digits", "scenario": {"name": "permuted", "num_tasks": 2}},
            "model": {"name": "masked_mlp", "kwargs": {"hidden": [32]}},
            "method": {"name": "impresslearn", "density": 0.5, "alpha_init": "best", "alpha_optim": {"name": "adam", "lr": 0.05}}}
    for recipe in ("authors_cifar", "authors_mnist"):
        p = build_experiment(build_config(data, recipe_overrides(recipe) + [f"method.recipe={recipe}", "method.impressions=2"])).method.params
        assert p.alpha_init == "uniform" and p.density == (0.25 if recipe == "authors_mnist" else 0.5)


# ---- 6: task-free prediction on a split scenario -------------------------------------------------------------------

def test_task_free_predictions_give_the_dataset_class_ids_of_a_split_scenario(tmp_path):
    exp, summary = fit(config("supsup", tasks=5, density=0.5, model={"name": "masked_mlp", "kwargs": {"hidden": [64]}}), tmp_path / "s")
    run = ContinualRun(tmp_path / "s", summary, exp.method, exp.method, exp.transform, exp.device)
    from kbricks.data import load_dataset

    test = load_dataset("digits").test
    assert [t.classes for t in exp.scenario] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    order = torch.argsort(test.y, stable=True)
    x, y = test.x[order][test.y[order] >= 6], test.y[order][test.y[order] >= 6]  # tasks 3 and 4's raw images, dataset labels
    out = run.predict(x, group=8)
    assert set(out.tasks.tolist()) <= {0, 1, 2, 3, 4} and out.labels.max() <= 1
    expected = torch.tensor([exp.scenario[t].classes[label] for t, label in zip(out.tasks.tolist(), out.labels.tolist())])
    assert torch.equal(out.global_labels, expected)
    known = out.tasks == y // 2  # groups whose task was inferred right: their global labels are the dataset's
    assert known.float().mean() > 0.3 and (out.global_labels[known] == y[known]).float().mean() > 0.8
    assert (out.labels == y).float().mean().item() == 0.0  # local labels are never 6..9: compared with y they are meaningless


def test_permuted_predictions_keep_the_dataset_labels_as_global_labels(tmp_path):
    exp, summary = fit(config("supsup", "permuted", 2, density=0.5), tmp_path / "p")
    run = ContinualRun(tmp_path / "p", summary, exp.method, exp.method, exp.transform, exp.device)
    out = run.predict(exp.scenario[1].test.x[:32])
    assert exp.scenario[1].classes is None and torch.equal(out.global_labels, out.labels)
    assert run.predict(exp.scenario[1].test.x[:0]).global_labels.shape == (0,)


# ---- 7: the exported model carries no training samples -------------------------------------------------------------

def test_an_er_runs_model_file_leaves_the_replay_buffer_to_the_checkpoint(tmp_path):
    exp, summary = fit(config("er", tasks=2, head="per_task", buffer_per_task=8), tmp_path / "er")
    with safe_open(str(tmp_path / "er" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("plugins.") for k in keys)
    assert any(k.startswith("net.") for k in keys)
    buffer = load_checkpoint(tmp_path / "er" / "ckpt" / "last.pt")["model"]["plugins.0._extra_state"]
    assert buffer["x"].shape[0] == 16 and buffer["task"].tolist() == [0] * 8 + [1] * 8
