import json

import pytest

from kbricks.studies import run_cl_study, run_kf_study, write_results


def test_quick_cl_study_and_report(tmp_path, monkeypatch):
    from kbricks.studies import cl

    # an even smaller budget than --quick, to keep the unit test fast
    tiny = ["train.epochs=4", "inference.trials_per_task=2", "data.scenario.num_tasks=3", "data.name=digits"]
    monkeypatch.setattr(cl, "CL_QUICK", tiny)
    summary = run_cl_study([0, 1], tmp_path / "runs", quick=True, log=lambda s: None)
    sup, il = summary["methods"]["supsup"], summary["methods"]["impresslearn_k3"]
    assert sup["forgetting"]["mean"] == 0.0 and il["forgetting"]["mean"] == 0.0
    assert sup["params_per_task"]["mean"] == 64 * 300 + 300 * 100 + 100 * 10
    assert il["params_per_task"]["mean"] == 3 * 3
    assert sup["avg_acc"]["n"] == 2 and len(sup["final_accs_mean"]) == 3
    # a second call reuses the finished runs
    again = run_cl_study([0, 1], tmp_path / "runs", quick=True, log=lambda s: None)
    assert again["methods"]["supsup"]["avg_acc"] == sup["avg_acc"]
    md = write_results(tmp_path / "runs", tmp_path / "results").read_text()
    assert "SupSup vs ImpressLearn" in md and "| supsup |" in md and "| impresslearn_k3 |" in md
    assert (tmp_path / "results/plots/cl_permuted_supsup_accuracy_matrix.png").exists()


@pytest.mark.slow
def test_kf_digits_factor_and_assembled_within_one_point_of_teacher(tmp_path):
    run_kf_study("digits", [0], tmp_path, log=lambda s: None)
    (report,) = json.loads((tmp_path / "kf/digits/study.json").read_text())["reports"]
    for t in report["tasks"]:
        assert abs(report[f"kf/acc_{t}"] - report[f"teacher/acc_{t}"]) <= 0.01
    assert report["assembled/acc"] >= report["teacher/acc"] - 0.01
    assert report["assembled_matches_factors"]


def test_claims_are_evaluated_from_study_outputs(tmp_path, monkeypatch):
    from kbricks.studies import CLAIMS, cl, evaluate_claims, write_reproduction

    monkeypatch.setattr(cl, "CL_QUICK", ["train.epochs=4", "inference.trials_per_task=2", "data.scenario.num_tasks=4", "data.name=digits"])
    run_cl_study([0], tmp_path / "runs", quick=True, log=lambda s: None)
    rows = evaluate_claims(tmp_path / "runs")
    assert len(rows) == len(CLAIMS)
    forgetting = next(r for r in rows if r["paper"].startswith("No forgetting"))
    assert forgetting["verdict"] == "holds" and "supsup 0.0000" in forgetting["ours"]
    params = next(r for r in rows if r["paper"].startswith("Orders of magnitude"))
    assert params["verdict"] == "holds" and "fewer entries" in params["ours"]
    assert all(r["verdict"] == "not run" for r in rows if r["area"] in ("KF", "SSKT"))
    md = write_reproduction(tmp_path / "runs", tmp_path, quick=True).read_text()
    assert "| SupSup/ImpressLearn |" in md and "**holds**" in md
