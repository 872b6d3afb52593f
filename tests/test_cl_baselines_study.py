"""The continual baselines study end to end on shrunken Split-digits configs, and its table."""

import yaml

from kbricks.studies.cl import CL_SCENARIOS
from kbricks.studies.cl_baselines import DENSE, run_cl_baselines_study, scenario_table
from kbricks.studies.common import configs_root


def test_cl_baselines_study_runs_every_method_and_renders_its_table(tmp_path):
    spec, shipped, root = CL_SCENARIOS["split"], configs_root(), tmp_path / "configs"
    for rel in (spec.supsup, spec.impresslearn, spec.finetune):
        cfg = yaml.safe_load((shipped / rel).read_text())
        cfg["train"].update(epochs=1, progress="off", plots=False)
        cfg["model"]["kwargs"] = {"widths": [4, 8]}
        if cfg.get("inference"):
            cfg["inference"]["trials_per_task"] = 2
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(yaml.safe_dump(cfg))
    study = run_cl_baselines_study([0], tmp_path / "runs", scenario="split", configs=root, log=lambda _: None)
    rec = study["runs"][0]
    assert rec["impresslearn"]["k"] == 2 and rec["impresslearn"]["donors"] == [0, 2]  # at most half of the 5 tasks, spread
    assert 0.0 <= rec["impresslearn"]["new_task_acc"] <= 1.0
    for method in DENSE:
        assert rec[f"{method}/per_task"]["uses_task_id"] is not False and rec[f"{method}/union"]["uses_task_id"] is False
        assert len(rec[f"{method}/union"]["final_accs"]) == 5
    assert rec["er/per_task"]["bytes_per_task"] > rec["finetune/per_task"]["bytes_per_task"]  # the replayed images count
    assert rec["ewc/per_task"]["fixed_bytes"] > 0 and rec["supsup"]["forgetting"] == 0
    table = "\n".join(scenario_table(study, "split"))
    assert "| ER (200 samples per task) | class-IL |" in table and "the 3 new tasks" in table
