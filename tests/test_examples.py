"""Every script in examples/ runs end to end at a tiny budget (``--quick``), in-process. (Plugin modules loaded with
``--import``, such as examples/fitnets.py, are not scripts: tests/test_extending.py runs them.)"""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if '__name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--out", str(tmp_path)] + (["--cli"] if script == "byo_teacher_kf.py" else []))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert (tmp_path / "result-seed0.json").exists(), out
    if script == "byo_teacher_kf.py":  # the Python-API and CLI paths both produced bricks that assemble
        assert "assembled from 2 bricks (Python API" in out and "assembled from 2 bricks (CLI" in out
        assert (tmp_path / "assembled-seed0.pt").exists()  # exported to TorchScript, checked against eager
