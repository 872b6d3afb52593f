"""The bench code (benchmarks/): statistics, the regression check against an old bench.json, and every bench's code
path in smoke mode (BENCH_QUICK=1, tiny sizes) down to the bench.md tables. No timing is asserted."""

import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))


@pytest.fixture
def quick_env(monkeypatch):
    monkeypatch.setenv("BENCH_QUICK", "1")
    monkeypatch.delenv("BENCH_ROUNDS", raising=False)
    monkeypatch.delenv("BENCH_CLOCK", raising=False)


def test_quartiles_and_interleaved_rounds(monkeypatch):
    import common

    assert common.quartiles([5, 1, 3, 2, 4]) == [2, 3, 4]
    assert common.quartiles([7.0]) == [7.0, 7.0, 7.0]
    monkeypatch.setenv("BENCH_ROUNDS", "5")
    monkeypatch.delenv("BENCH_QUICK", raising=False)
    calls = []
    res = common.time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "a", inner=2, warmup=1)
    assert calls.count("a") == calls.count("b") == 1 + 5 * 2
    assert calls[2:4] == ["a", "a"] and calls[6:8] == ["b", "b"]  # round 0 starts with a, round 1 with b
    for r in res.values():
        assert r["ms"]["n"] == r["ratio"]["n"] == 5 and len(r["ratio"]["iqr"]) == 2
        assert r["ms"]["iqr"][0] <= r["ms"]["median"] <= r["ms"]["iqr"][1]
    assert res["a"]["ratio"] == {"median": 1.0, "iqr": [1.0, 1.0], "n": 5}
    assert common.fmt_stat({"median": 1.234, "iqr": [1.2, 1.3]}, suffix="x") == "1.23x [1.20–1.30]"


def test_plain_copies_carry_no_hooks():
    import bench_kf
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    seen = []
    net[0].register_forward_hook(lambda *a: seen.append("fwd"))
    net.register_forward_pre_hook(lambda *a: seen.append("pre"))
    copy = bench_kf.plain(net)
    copy(torch.randn(4, 3)).sum().backward()
    assert seen == [] and torch.equal(copy[0].weight, net[0].weight)
    net(torch.randn(1, 3))
    assert seen == ["pre", "fwd"]  # the original keeps its hooks


def test_plain_loop_builds_the_optimiser_the_config_names():
    import bench_trainer
    import torch

    from kbricks import load_config
    from kbricks.studies import configs_root

    params = list(torch.nn.Linear(3, 2).parameters())
    for name, kind in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)):
        cfg = load_config(configs_root() / "teacher/digits_cnn.yaml", [f"optim.name={name}", "optim.lr=0.003", "optim.momentum=0.7",
                                                                        "optim.weight_decay=0.01"])
        opt = bench_trainer.plain_optimizer(cfg.optim, params)
        group = opt.param_groups[0]
        assert type(opt) is kind and group["lr"] == 0.003 and group["weight_decay"] == 0.01
        if name in ("sgd", "rmsprop"):
            assert group["momentum"] == 0.7
    cfg = load_config(configs_root() / "teacher/digits_cnn.yaml", ["optim.schedule=step"])
    with pytest.raises(ValueError, match="cosine schedule without warm-up"):
        bench_trainer.plain_loop(cfg, None)


def stat(m):
    return {"median": m, "iqr": [m, m], "n": 5}


def test_regressions_against_an_old_layout_bench_json():
    import run_all

    old = {"kf": {"digits, T=1": {"base/ms": 10.0, "base/ratio": 1.0, "step/ms": 12.0, "step/ratio": 1.2}}}
    new = {"kf": {"digits, T=1": {"baseline": "base", "candidates": {
        "base": {"ms": stat(10.0), "ratio": stat(1.0)}, "step": {"ms": stat(14.0), "ratio": stat(1.4)},
        "fresh": {"ms": stat(9.0), "ratio": stat(0.9)}}}},
        "supermask": {"memory at T=250": {"T": 250, "values": {"bits per stored weight, after one-shot inference": 1.5}}}}
    flagged = run_all.regressions(new, old, ["kf", "supermask"])
    assert flagged == {("kf", "digits, T=1", "step"): (1.2, 1.4)}  # 'fresh' and the memory row are new, not flagged
    rows_new, rows_old = run_all.flat_rows(new), run_all.flat_rows(old)
    assert run_all.change(("kf", "digits, T=1", "fresh"), rows_new, rows_old) == "new"
    assert "worse" in run_all.change(("kf", "digits, T=1", "step"), rows_new, rows_old)
    assert not run_all.regressions(new, {"kf": {"digits, T=1": {"step/ratio": 1.3}}}, ["kf"])  # +7.7 %: within 10 %


def test_every_bench_in_smoke_mode_renders_the_tables(quick_env, tmp_path):
    import bench_kf
    import bench_supermask
    import bench_trainer
    import run_all
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {"kf": bench_kf.main(["digits"]), "trainer": bench_trainer.main(), "supermask": bench_supermask.main()}
    finally:
        torch.set_num_threads(threads)
    json.dumps(results)  # bench.json must hold it
    kf = results["kf"]
    for t in (1, 2):
        block = kf[f"digits, T={t}, plain bound"]
        assert block["baseline"] == bench_kf.BOUND and block["compares"].endswith(".")
        assert set(block["candidates"]) == {bench_kf.BOUND, bench_kf.KF, bench_kf.KF_LOOP, bench_kf.KF_ONE_VIEW}
        assert block["candidates"][bench_kf.BOUND]["ratio"]["median"] == 1.0
    growth = kf["digits, growth T=1 to 2"]
    assert growth["flop ratio"] > 1 and growth["growth / FLOP growth"]["median"] > 0
    mem = results["supermask"]["memory at T=20"]["values"]
    assert mem["stored mask weights"] == 20 * (784 * 300 + 300 * 100 + 100 * 10)
    assert mem["bits per stored weight, after storing"] >= 1  # at least the packed masks themselves
    cold = results["supermask"]["one-shot inference, cold vs warm"]["candidates"]
    assert {"T=5, warm", "T=20, warm", "T=5, cold (first call, fresh strategy)", "T=20, cold (first call, fresh strategy)"} == set(cold)
    assert results["trainer"]["digits teacher"]["candidates"]["kbricks run_training"]["ratio"]["n"] == 2
    assert "same work" in results["trainer"]["digits teacher"]["compares"] and "plots off" in results["trainer"]["digits teacher"]["compares"]

    meta = {"device": "test", "threads": 1, "clock": "cpu", "quick": True, "load_average_at_start": 0.0, "commit": "abc", "date": "today"}
    md = run_all.render(results, meta, {}, old={}, out=tmp_path)
    assert (tmp_path / "bench.md").read_text() == md
    goals = md.split("## Issue 24 goals")[1].split("##")[0]
    assert "| goal | measured: median [IQR] | target | status |" in goals
    for d in ("digits", "dsprites"):
        for t in (1, 2, 4, 8):
            assert f"| KF step / plain bound, {d}, T={t} |" in goals
    assert "| KF step / plain bound, digits, T=1 | " in goals and "not measured" in goals  # dSprites, T=4, 8 not run
    assert "growth T=1→2 / FLOP growth, digits" in goals and "one-shot inference, T=20: cold (first call) / warm" in goals
    assert "bits per stored weight" not in goals and "memory held per stored mask weight" in goals
    rows = [line.strip("| ").split(" | ") for line in goals.splitlines() if line.startswith("| ") and "status" not in line]
    assert len(rows) == 12 and all(r[-1] in ("met", "not met", "not measured") for r in rows)
    assert [r[-1] for r in rows].count("not measured") == 7  # digits T = 4, 8; every dSprites row (not run here)
    assert "ms: median [IQR]" in md and "ratio to" in md and "Not compared: a smoke run" in md
