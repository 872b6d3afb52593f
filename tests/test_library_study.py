"""The library study end to end on shrunken configs: every training it runs, the extension's CKN check, the record."""

import shutil

import yaml

from kbricks.studies.common import configs_root
from kbricks.studies.kf import KF_STUDIES
from kbricks.studies.library import run_library_study


def test_library_study_runs_end_to_end_on_tiny_configs(tmp_path):
    shipped, root = configs_root(), tmp_path / "configs"
    for rel in KF_STUDIES["digits"]:  # the study's own configs, one epoch on 128 images, narrow networks
        cfg = yaml.safe_load((shipped / rel).read_text())
        cfg["data"]["train_subset"] = 128
        cfg["train"].update(epochs=1, progress="off", plots=False)
        cfg["model"]["kwargs"] = {"widths": [4, 8]}
        if cfg["method"].get("tsn"):
            cfg["method"]["tsn"]["kwargs"] = {"widths": [4, 4]}
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(yaml.safe_dump(cfg))
    summary = run_library_study("digits", [0], tmp_path / "runs", configs=root, log=lambda _: None)
    report = summary["metrics"]
    assert report["ckn_files_unchanged"]["mean"] == 1.0 and report["ckn_tensors_equal"]["mean"] == 1.0
    for key in ("teacher/acc", "joint/acc", "extend/acc", "amal/acc", "kd/acc", "amal/acc_low", "teacher_high/acc"):
        assert 0.0 <= report[key]["mean"] <= 1.0, key
    assert report["amal/params"]["mean"] > 0 and (tmp_path / "runs/library/digits/study.json").exists()
    shutil.rmtree(tmp_path / "runs")
