"""ImpressLearn: coefficients over all k impressions, never worse than the best single impression on the training
data, impressions from another run, homogeneous impressions with their own data order; inference by re-fitting."""

import pytest
import torch

from kbricks import build_config
from kbricks.continual.inference import infer_task, refit_coefficients
from kbricks.core.rundir import RunDirectory
from kbricks.engine.continual import ContinualTrainer
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_continual
from kbricks.errors import ConfigError
from kbricks.models.masked import CachedWeights, Combination


def random_masks(net, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.rand(layer.weight.shape, generator=g) < 0.5 for layer in net.masked_layers()] for _ in range(n)]


def tiny(method="impresslearn", tasks=3, **over):
    data = {"name": method, "data": {"name": "digits", "scenario": {"name": "permuted", "num_tasks": tasks}},
            "model": {"name": "masked_mlp", "kwargs": {"hidden": [64, 64]}},
            "method": {"name": method, **({"density": 0.5} if method != "finetune" else {})},
            "optim": {"name": "adam", "lr": 0.02, "weight_decay": 0.0, "schedule": "constant"},
            "train": {"epochs": 4, "batch_size": 64, "progress": "off", "plots": False}}
    if method == "impresslearn":
        data["method"].update(impressions=2, alpha_epochs=2)
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


def fit(cfg, tmp_path, name="run"):
    exp = build_experiment(cfg)
    ContinualTrainer(exp, RunDirectory.open(tmp_path / name, "runs", "x", 0, resume=False)).fit()
    return exp


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """Heterogeneous ImpressLearn, k=2 (the masks of tasks 0 and 1), 3 tasks: shared by the tests below."""
    return fit(tiny(), tmp_path_factory.mktemp("hetero"))


def single_and_learned(strategy, t):
    k = strategy.net.num_stored()
    sources = [CachedWeights(strategy.net, Combination(strategy.one_hot(i))) for i in range(k)]
    sources.append(CachedWeights(strategy.net, Combination(strategy.coefficients(t))))
    accs = [a for a, _ in strategy.score_sources(sources, t)]
    return accs[:-1], accs[-1]


def check_never_below_best_single(s):
    layers, k = len(s.net.masked_layers()), s.net.num_stored()
    assert k == 2 and sorted(s.alphas) == [0, 1, 2]
    for t in range(3):
        assert s.alphas[t].shape == (layers, k)  # the seed task 0 too: fit once both impressions existed
        singles, learned = single_and_learned(s, t)
        assert learned >= max(singles), f"task {t}: combination {learned} < best single impression {max(singles)}"
    kept = [bool(f[3]) for f in s.fit_info.values()]
    # the log in results.json says which start was chosen and whether the learned alpha was kept
    assert s.summary()["alpha_fit"]["kept_learned"] == kept
    return kept


def test_alpha_spans_all_impressions_and_never_loses_to_a_single_one_on_training_data(hetero):
    check_never_below_best_single(hetero.method)


def test_the_guard_replaces_a_wrecked_alpha(tmp_path):
    # two Adam steps of lr 4 from 1/k wreck the coefficients: the guard must fall back to the best start
    exp = fit(tiny(**{"method.alpha_optim.lr": 4.0, "method.alpha_init": "uniform", "method.alpha_epochs": 1,
                      "train.max_steps_per_epoch": 2}), tmp_path)
    assert not all(check_never_below_best_single(exp.method))


def test_authors_settings_start_seed_tasks_at_their_own_impression_and_keep_what_they_learn():
    exp = build_experiment(tiny(**{"method.alpha_init": "uniform", "method.start_at_optimal": True, "method.keep_best": False,
                                   "method.alpha_optim": "{name: adam, lr: 0.02, weight_decay: 0.01, schedule: constant}"}))
    s = exp.method
    for m in random_masks(s.net, 2):  # the two impressions of the seed tasks 0 and 1
        s.net.store(m)
    from kbricks.continual.strategy import Stage

    starts = {t: s.begin_stage(Stage("alpha", t, s.params.alpha_optim, 1))[0].detach().clone() for t in range(3)}
    assert torch.equal(starts[0], s.one_hot(0)) and torch.equal(starts[1], s.one_hot(1))  # seed tasks
    assert torch.allclose(starts[2], torch.full_like(starts[2], 0.5))  # a new task: 1/k
    s.begin_stage(Stage("alpha", 2, s.params.alpha_optim, 1))
    with torch.no_grad():
        s.alpha.copy_(torch.tensor([[9.0, -9.0]] * 3))  # whatever was learned is kept (no guard)
    s.end_stage(Stage("alpha", 2, s.params.alpha_optim, 1))
    assert torch.equal(s.alphas[2], torch.tensor([[9.0, -9.0]] * 3)) and s.fit_info[2][3].item() == 1.0


def test_homogeneous_impressions_use_their_own_data_order(tmp_path):
    exp = build_experiment(tiny(tasks=2, **{"method.source": "homogeneous", "method.impressions": 3, "train.epochs": 1,
                                            "method.alpha_epochs": 1, "train.max_steps_per_epoch": 2}))
    s = exp.method
    first_batch = {}
    step = s.training_step

    def record(batch):
        key = (s.stage.name, s.stage.index)
        first_batch.setdefault(key, batch.index[:16].clone())
        return step(batch)

    s.training_step = record
    ContinualTrainer(exp, RunDirectory.open(tmp_path / "r", "runs", "x", 0, resume=False)).fit()
    orders = [first_batch[("impression", j)] for j in range(3)]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    masks = [s.net.masked_layers()[0].bank.get(j) for j in range(3)]
    assert not torch.equal(masks[0], masks[1])
    assert s.net.num_stored() == 3 and sorted(s.alphas) == [0, 1]


def test_impressions_stored_by_a_supsup_run_are_reused(tmp_path):
    sup = tiny("supsup", **{"train.epochs": 3})
    run_continual(sup, tmp_path / "sup")
    exp = fit(tiny(**{"method.source": "stored", "method.from_run": str(tmp_path / "sup"), "method.slots": [2, 0], "method.alpha_epochs": 1,
                                                                            "train.max_steps_per_epoch": 2}), tmp_path)
    s = exp.method
    sup_exp = build_experiment(sup)
    from kbricks.core.checkpoint import load_checkpoint, load_state_into

    load_state_into(sup_exp.method, load_checkpoint(tmp_path / "sup" / "ckpt" / "last.pt")["model"])
    for layer, donor in zip(s.net.masked_layers(), sup_exp.method.net.masked_layers()):
        assert torch.equal(layer.bank.get(0), donor.bank.get(2)) and torch.equal(layer.bank.get(1), donor.bank.get(0))
    assert s.own_slot == {2: 0, 0: 1}
    # task 0's own mask is impression 1: the best start, and the combination is at least as good on training data
    assert s.fit_info[0][0].item() == 1
    with pytest.raises(ConfigError, match="different backbone"):
        build_experiment(tiny(seed=1, **{"method.source": "stored", "method.from_run": str(tmp_path / "sup")}))
    with pytest.raises(ConfigError, match="slot 7 requested"):
        build_experiment(tiny(**{"method.source": "stored", "method.from_run": str(tmp_path / "sup"), "method.slots": [0, 7]}))
    with pytest.raises(ConfigError, match="needs from_run"):
        tiny(**{"method.source": "stored"})


def test_refit_without_task_id(hetero, tmp_path):
    s = hetero.method
    s.eval()
    x = hetero.transform(hetero.scenario[1].test.x[:64], train=False)
    y = hetero.scenario[1].test.y[:64]
    # zero steps from the one-shot choice is exactly classifying with that task's stored alpha
    logits, nearest = refit_coefficients(s, x, "nearest", steps=0)
    chosen = infer_task(s, x, "one_shot")
    assert nearest == chosen and torch.allclose(logits, s.predict_task(x, chosen), atol=1e-5)
    logits, nearest = refit_coefficients(s, x, "uniform", steps=20, lr=0.05)
    assert logits.shape == (64, 10) and (logits.argmax(1) == y).float().mean() > 0.3  # chance 0.1
    with pytest.raises(ValueError, match="no coefficients"):
        refit_coefficients(fit(tiny("supsup", tasks=2, **{"train.epochs": 1, "train.max_steps_per_epoch": 1}), tmp_path).method, x)


def test_dense_finetune_baseline_forgets(tmp_path):
    r = run_continual(tiny("finetune", **{"optim.lr": 0.005, "train.epochs": 3}), tmp_path / "ft")
    assert r["forgetting"] > 0.1 and r["bwt"] < -0.1
    assert r["bytes_per_task"] == 0 and r["shared_params"] == 64 * 64 + 64 * 64 + 64 * 10
    assert r["accuracy_matrix"][0][0] > 0.5
