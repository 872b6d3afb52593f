"""Paper-scale recipes (configs/paper/, studies/paper.py): the architectures against the papers, the recipes against
their configs, and a smoke run of every recipe on a tiny synthetic data root written in the real on-disk formats
(CIFAR python pickle batches, ImageFolder PNG trees): 2 steps per run on small networks, so the recipes cannot rot."""

import glob
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from kbricks.cli import main
from kbricks.data import load_dataset
from kbricks.data.scenarios import split
from kbricks.engine.experiment import load_config
from kbricks.errors import DataError
from kbricks.models import count_parameters, create_model
from kbricks.models.factorized import TaskSpecificNetwork, task_output_size
from kbricks.models.supermask import supermask
from kbricks.studies import paper

CONFIGS = Path(REPO) / "configs"
ONE_THREAD = ["train.num_threads=1"]  # tiny networks: one thread is much faster than two on a busy machine


# ---- architectures and scenario ---------------------------------------------------------------------------


def test_gem_resnet18_has_the_supsup_papers_weights():
    net = create_model("gem_resnet18", num_classes=5, in_channels=3, image_size=32)
    assert count_parameters(net) == 1_090_940  # SupSup: "1.09 M"; no biases, no affine BatchNorm
    sm = supermask(net)
    assert sm.weights_per_mask() == 1_090_940 and len(sm.masked_layers()) == 21
    assert sm.bn_values_per_task() == 3_000  # 1,500 BN channels x (mean, var) per task
    assert not any(p.requires_grad for p in sm.parameters())
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5) and net.feature_dim == 160


@pytest.mark.parametrize("depth,widen,millions", [(40, 1, 0.6), (40, 2, 2.2), (40, 4, 8.9), (16, 8, 11.0), (28, 10, 36.5)])
def test_wide_resnets_of_the_kd_students_match_the_wrn_paper(depth, widen, millions):
    """Zagoruyko & Komodakis 2016, Table 1 (CIFAR-10): the family the KD students (WRN-40-2, -28-3, -40-3) come from."""
    n = count_parameters(create_model("wrn", num_classes=10, depth=depth, widen=widen))
    assert round(n / 1e6, 1) == millions, n


def test_split_with_class_order_seed_is_supsups_random_split():
    data = load_dataset("digits")
    tasks = split(data, num_tasks=5, class_order_seed=3)
    perm = np.random.RandomState(3).permutation(10)  # RandSplitCIFAR100: np.random.seed(seed); permutation
    for i, t in enumerate(tasks):
        classes = perm[2 * i: 2 * i + 2]
        want = torch.isin(data.train.y, torch.tensor(classes))
        assert len(t.train) == int(want.sum())
        # label = position of the class in the task's slice of the permutation
        assert torch.equal(t.train.y, torch.tensor([list(classes).index(c) for c in data.train.y[want].tolist()]))
    plain = split(data, num_tasks=5)
    assert torch.equal(plain[0].train.x, data.train.x[data.train.y < 2])  # default unchanged: consecutive classes


# ---- the recipes and their configs -------------------------------------------------------------------------


def test_every_paper_config_belongs_to_a_recipe_and_loads_with_its_overrides(tmp_path):
    shipped = {str(Path(p).relative_to(CONFIGS)) for p in glob.glob(str(CONFIGS / "paper" / "**" / "*.yaml"), recursive=True)}
    used = {r.config for r in paper.RUNS.values()}
    assert shipped == used  # no orphan config, no missing one
    in_recipes = {rid for rec in paper.RECIPES.values() for rid in rec.run_order()}
    assert in_recipes == set(paper.RUNS)
    for rid, run in paper.RUNS.items():
        for smoke in (False, True):
            cfg = load_config(CONFIGS / run.config, paper.run_overrides(rid, 1, tmp_path / "d", tmp_path / "o", smoke, []))
            assert cfg.data.root == str(tmp_path / "d" / paper.DATA[run.data].folder)
            assert cfg.seed == (0 if run.shared else 1)
    sskt = load_config(CONFIGS / paper.RUNS["sskt-cifar10-sskt"].config, paper.run_overrides("sskt-cifar10-sskt", 2, tmp_path, tmp_path / "o", False, []))
    assert sskt.method.params()["sources"] == [str(tmp_path / "o" / "runs" / s) for s in paper.SOURCES]  # shared: no seed folder
    cl = load_config(CONFIGS / paper.RUNS["supsup-splitcifar100"].config, paper.run_overrides("supsup-splitcifar100", 4, tmp_path, tmp_path, False, []))
    assert cl.data.scenario.kwargs() == {"num_tasks": 20, "class_order_seed": 4}


def kf_inference_params(cfg) -> int:
    """CKN + every TSN as used at test time (the log-variance and task-only heads only serve training)."""
    data = {"cifar10": 10, "cifar100": 20}[cfg.data.name]
    ckn = create_model(cfg.model.name, num_classes=0, in_channels=3, image_size=32, **cfg.model.kwargs)
    from kbricks.data import build_tasks
    from kbricks.data.base import ArrayDataset

    ds = ArrayDataset(torch.zeros(data, 3, 1, 1), torch.arange(data), [str(i) for i in range(data)])
    p = cfg.method.params()
    total = count_parameters(ckn)
    for task in build_tasks(cfg.data.tasks, ds):
        tsn = TaskSpecificNetwork(create_model(p["tsn"]["name"], num_classes=0, in_channels=3, image_size=32, **p["tsn"]["kwargs"]),
                                  p["tsn_dim"], ckn.feature_dim, task_output_size(task, data), p["combine"])
        total += count_parameters(tsn) - count_parameters(tsn.logvar) - count_parameters(tsn.task_head)
    return total


@pytest.mark.parametrize("kf,kd", [("kf-cifar10-1task", "kd-cifar10-wrn40_2"), ("kf-cifar10-2tasks", "kd-cifar10-wrn28_3"),
                                   ("kf-cifar100coarse-4tasks", "kd-cifar100coarse-wrn40_3")])
def test_kd_baselines_are_the_size_of_their_kf_networks(kf, kd):
    kf_cfg, kd_cfg = (load_config(CONFIGS / paper.RUNS[r].config) for r in (kf, kd))
    n_kf = kf_inference_params(kf_cfg)
    n_kd = count_parameters(create_model(kd_cfg.model.name, num_classes=10 if kd_cfg.data.name == "cifar10" else 20, **kd_cfg.model.kwargs))
    assert abs(n_kd - n_kf) / n_kf < 0.05, (n_kf, n_kd)
    # the KF run and its baseline share data, teacher, optimiser, schedule, epochs and clipping
    assert kf_cfg.optim == kd_cfg.optim and kf_cfg.train.epochs == kd_cfg.train.epochs and kf_cfg.train.grad_clip == kd_cfg.train.grad_clip
    assert kf_cfg.method.params()["teacher"] == kd_cfg.method.params()["teacher"]


def test_sskt_baselines_share_the_targets_schedule():
    for t in ("cifar10", "cifar100"):
        cfgs = {m: load_config(CONFIGS / paper.RUNS[f"sskt-{t}-{m}"].config) for m in ("scratch", "teacher", "kd", "dml", "maxl", "sskt")}
        base = cfgs["scratch"]
        for m, c in cfgs.items():
            assert (c.optim, c.train.epochs, c.train.batch_size, c.data) == (base.optim, base.train.epochs, base.train.batch_size, base.data), m


# ---- data root: present, partial, missing --------------------------------------------------------------------


def test_missing_data_root_is_one_line_naming_the_files(tmp_path, capsys):
    assert main(["reproduce", "--scale", "paper", "--data-root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("kbricks: error: data root")
    assert "cifar-10-batches-py/{data_batch_1,data_batch_2,data_batch_3,data_batch_4,data_batch_5,test_batch}" in err
    assert "cifar-100-python/{train,test}" in err and "sskt-sources/imagenet/<class>/<image>" in err
    # an empty root: the same one line, "missing ..."
    (tmp_path / "empty").mkdir()
    assert main(["reproduce", "--scale", "paper", "--data-root", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no paper-scale recipe can run" in err and "missing cifar-10-batches-py/{data_batch_1" in err
    assert main(["reproduce", "--scale", "paper"]) == 2 and "needs --data-root" in capsys.readouterr().err
    assert main(["reproduce", "--scale", "paper", "--data-root", str(tmp_path), "--only", "kf-imagenet"]) == 2
    assert "unknown paper recipe 'kf-imagenet'" in capsys.readouterr().err


def test_partial_data_root_runs_what_it_can_and_names_the_rest(tmp_path, capsys):
    root = paper.write_synthetic_data(tmp_path / "d")
    for f in (root / "cifar-100-python").iterdir():
        f.unlink()
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"no paper-scale recipe can run .* missing cifar-10-batches-py/data_batch_3, cifar-100-python/\{train,test\}"):
        paper.plan(root)
    root = paper.write_synthetic_data(tmp_path / "d2")
    for f in (root / "cifar-100-python").iterdir():
        f.unlink()
    assert main(["reproduce", "--scale", "paper", "--data-root", str(root), "--check"]) == 0
    out = capsys.readouterr().out
    assert "run   kf-cifar10 " in out and "run   sskt-cifar10 " in out
    assert re.search(r"skip  supsup-splitcifar100 +missing cifar-100-python/\{train,test\}", out)
    assert "DATA_ROOT/cifar-100-python/{train,test}" in out  # the expected layout


# ---- smoke: every recipe end to end, 2 steps per run ------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper")
    threads = torch.get_num_threads()
    yield paper.write_synthetic_data(base / "data"), base / "out"
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", list(paper.RECIPES))
def test_recipe_smoke(recipe, smoke_root):
    root, out = smoke_root
    stale = paper.run_dir_of(out / "paper-smoke", paper.RECIPES[recipe].rows[0].run, 0)
    if not stale.exists():  # a run killed before its first checkpoint: started again, not refused
        stale.mkdir(parents=True)
        (stale / "config.yaml").write_text("killed\n")
    md = paper.run_paper_study(root, out, seeds=[0], only=[recipe], smoke=True, overrides=ONE_THREAD, log=lambda s: None)
    study = json.loads((out / "paper-smoke" / "study.json").read_text())
    rec = study["recipes"][recipe]
    assert rec["status"] == "ran" and len(rec["rows"]) == len(paper.RECIPES[recipe].rows)
    for row in rec["rows"]:
        assert row["values"] and all(0.0 <= v <= 1.0 for v in row["values"]), row
    assert recipe in md.read_text()
    assert main(["reproduce", "--scale", "paper", "--out", str(out), "--smoke", "--tables-only"]) == 0  # from study.json alone
    assert md.read_text() == paper.paper_table(study)
    runs = out / "paper-smoke" / "runs"
    for rid in paper.RECIPES[recipe].run_order():
        run_dir = paper.run_dir_of(out / "paper-smoke", rid, 0)
        assert (run_dir / "results.json").exists() and (run_dir / "model.json").exists(), rid
    kf_tasks = {"kf-cifar10": ("kf-cifar10-1task", 1), "kf-cifar10-2tasks": ("kf-cifar10-2tasks", 2),
                "kf-cifar100coarse-4tasks": ("kf-cifar100coarse-4tasks", 4)}
    if recipe in kf_tasks:  # one TSN brick per task, next to the CKN brick
        kf_run, n = kf_tasks[recipe]
        bricks = paper.run_dir_of(out / "paper-smoke", kf_run, 0) / "bricks"
        assert (bricks / "ckn.json").exists() and len(list(bricks.glob("tsn-*.json"))) == n
    results = paper.run_dir_of(out / "paper-smoke", paper.RECIPES[recipe].rows[0].run, 0) / "results.json"
    stamp = results.stat().st_mtime_ns
    paper.run_paper_study(root, out, seeds=[0], only=[recipe], smoke=True, overrides=ONE_THREAD, log=lambda s: None)
    assert results.stat().st_mtime_ns == stamp  # finished runs are reused, not retrained
    if "splitcifar100" in recipe:
        res = json.loads((runs / recipe / "seed0" / "results.json").read_text())
        assert len(res["final_accs"]) == 20 and res["forgetting"] == 0.0  # 20 tasks x 5 classes, nothing forgotten
    if recipe.startswith("sskt"):
        # the sources were trained on the ImageFolder trees (other label spaces, 40 and 48 px images resized to 32)
        cards = [json.loads((runs / s / "model.json").read_text()) for s in paper.SOURCES]
        assert [c["num_classes"] for c in cards] == [4, 3] and all(c["image_size"] == 32 for c in cards)
        sskt = load_config(runs / f"{recipe}-sskt" / "seed0" / "config.yaml")
        assert sskt.method.params()["sources"] == [str(runs / s) for s in paper.SOURCES]


def test_state_digest_sees_weights_and_masks_but_not_batchnorm_statistics():
    net = supermask(create_model("gem_resnet18", num_classes=5, nf=2))
    net.store_scores(net.new_scores(torch.Generator().manual_seed(0)))  # packed masks + a 0-dim count in the state
    before = paper.state_digest(net)
    bn = net._bns[0]
    bn.running_mean.add_(1.0)
    assert paper.state_digest(net) == before  # per-rank BatchNorm statistics may differ
    net.store_scores(net.new_scores(torch.Generator().manual_seed(1)))
    assert paper.state_digest(net) != before
    dense = create_model("resnet20", num_classes=10, width=4)
    d0 = paper.state_digest(dense)
    with torch.no_grad():
        next(dense.parameters())[0].add_(1e-6)
    assert paper.state_digest(dense) != d0


# ---- multi-process: a recipe under torchrun ------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow  # a whole recipe under torchrun; test_dist.py covers DDP in the default suite
def test_recipe_under_torchrun_two_cpu_ranks(tmp_path):
    """`torchrun -m kbricks reproduce --scale paper` with 2 CPU ranks (gloo): the KF CIFAR-10 recipe (teacher, KF,
    KD) trains as DDP, rank 0 alone writes, and every run ends with the ranks holding the same weights. SyncBatchNorm
    is off here: with it on, a rank of this recipe aborted once under torchrun on CPU (not yet diagnosed; the CPU
    SyncBatchNorm itself is covered by tests/test_dist.py)."""
    import subprocess
    import sys

    root = paper.write_synthetic_data(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kbricks", "reproduce",
           "--scale", "paper", "--data-root", str(root), "--out", str(tmp_path / "out"), "--only", "kf-cifar10", "--smoke",
           "--seeds", "0", "-o", "train.num_threads=1", "-o", "train.sync_batchnorm=false"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("# Paper-scale recipes") == 1  # printed by rank 0 only
    rec = json.loads((tmp_path / "out" / "paper-smoke" / "study.json").read_text())["recipes"]["kf-cifar10"]
    assert rec["status"] == "ran" and rec["world_size"] == 2 and rec["ranks_in_sync"] is True
    for rid in paper.RECIPES["kf-cifar10"].run_order():
        run_dir = paper.run_dir_of(tmp_path / "out" / "paper-smoke", rid, 0)
        assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
        assert rec["runs"][rid][0]["ranks_in_sync"] is True and rec["runs"][rid][0]["world_size"] == 2
