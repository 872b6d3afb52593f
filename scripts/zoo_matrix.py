"""Run the zoo matrix (tests/test_zoo_matrix.py) and write its table (model x role -> pass) into docs/byo.md.

    python scripts/zoo_matrix.py                  # run the tests, rewrite the table between the markers
    python scripts/zoo_matrix.py --junit r.xml    # the table from an existing pytest --junitxml report

The table sits between ``<!-- zoo-matrix:start -->`` and ``<!-- zoo-matrix:end -->`` in docs/byo.md; a "Zoo matrix"
section is appended when the markers are missing. Exit status 1 when a cell failed (the table is written anyway).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
TESTS = "tests/test_zoo_matrix.py"
START, END = "<!-- zoo-matrix:start -->", "<!-- zoo-matrix:end -->"
ROLES = {  # test function -> column
    "test_kf_teacher": "KF teacher → bricks → assembled → TorchScript",
    "test_kd_teacher": "KD teacher",
    "test_kd_student": "KD student",
    "test_sskt_source": "SSKT source",
    "test_sskt_student": "SSKT student",
    "test_supermask_backbone": "SupSup backbone (2 tasks, no forgetting)",
    "test_features_by_layer_name": "features by layer name",
}
SECTION = """
## Zoo matrix

Every torchvision / timm network below is built with random weights (`weights=None` / `pretrained=False`: nothing
is downloaded) and run in each role by `tests/test_zoo_matrix.py` (part of `make test`) on 64 random 3x32x32 images,
one optimiser step per epoch. A cell passes when the role does what it promises: KF teacher: bricks written, the
assembled network exported to TorchScript and equal to eager; KD / SSKT teacher or source: the run's frozen copy
gives the user's network's outputs; student: trained, reloaded from its run with the same outputs; SupSup: task 1's
logits identical after task 2 and every layer masked (supermask()'s equivalence check passes on conversion);
features: a `features:` layer named in the spec is what is read (and sizes KF's InfoMax projector). Students and
backbones are named by spec string (`timm:resnet18`, `{name: timm:vit_tiny_patch16_224, kwargs: {depth: 2}}`) or
import path (`torchvision.models:VisionTransformer`, `timm.models.resnetv2:ResNetV2`, whose classifier is a 1x1
`Conv2d`, so its spec names it: `head: head.fc`); teachers and sources are the `nn.Module` objects. Every role applies
to every classifier here; one that did not would read `n/a: <why>`. `python scripts/zoo_matrix.py` reruns the tests
and rewrites the table between the markers (timings are pytest's, on a machine shared with other jobs).

""" + f"{START}\n{END}\n"


def run_tests(junit: Path) -> str:
    """Runs the matrix; returns the machine's load when it started (the timings depend on it)."""
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", TESTS, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    return f", {os.cpu_count()} CPUs at load average {load}"


def read_results(junit: Path) -> Tuple[Dict[str, Dict[str, str]], Dict[str, float], float]:
    """{model: {role: cell}}, seconds per model, seconds of the whole matrix."""
    tree = ET.parse(junit)
    suites = [tree.getroot()] if tree.getroot().tag == "testsuite" else list(tree.getroot())
    cells: Dict[str, Dict[str, str]] = {}
    seconds: Dict[str, float] = {}
    for suite in suites:
        for case in suite.iter("testcase"):
            match = re.fullmatch(r"(\w+)\[(.+)\]", case.get("name", ""))
            if match is None or match.group(1) not in ROLES:
                continue
            role, model = match.groups()
            cells.setdefault(model, {})[role] = _cell(case)
            seconds[model] = seconds.get(model, 0.0) + float(case.get("time", 0))
    total = sum(float(s.get("time", 0)) for s in suites)
    return cells, seconds, total


def _cell(case: ET.Element) -> str:
    for tag in ("failure", "error"):
        node = case.find(tag)
        if node is not None:
            return "**FAIL**: " + _first_line(node.get("message", ""))
    node = case.find("skipped")
    if node is not None:
        message = _first_line(node.get("message", ""))
        if node.get("type") == "pytest.xfail":
            return "xfail: " + message
        return message if message.startswith("n/a") else "skipped: " + message
    return "pass"


def _first_line(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    return text.replace("|", "\\|")[:200]


def versions() -> str:
    import timm
    import torch
    import torchvision

    return f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}"


def render(cells: Dict[str, Dict[str, str]], seconds: Dict[str, float], total: float, machine: str = "") -> str:
    notes: List[str] = []

    def short(cell: str) -> str:
        if cell in ("pass", "not run"):
            return cell
        if cell not in notes:
            notes.append(cell)
        kind = cell.split(":")[0].strip("*")
        return f"{kind} [{notes.index(cell) + 1}]"

    head = "| model | " + " | ".join(ROLES.values()) + " | seconds |"
    lines = [head, "|---" * (len(ROLES) + 2) + "|"]
    for model, row in cells.items():
        lines.append(f"| `{model}` | " + " | ".join(short(row.get(r, "not run")) for r in ROLES) + f" | {seconds[model]:.1f} |")
    passed = sum(c == "pass" for row in cells.values() for c in row.values())
    count = sum(len(row) for row in cells.values())
    out = [f"Run {datetime.date.today().isoformat()} with {versions()} (CPU, OMP_NUM_THREADS="
           f"{os.environ.get('OMP_NUM_THREADS', '2')}{machine}): {passed} of {count} cells pass; the matrix took {total:.1f} s "
           "(pytest's time for tests/test_zoo_matrix.py, imports excluded).", "", *lines]
    if notes:
        out += ["", *[f"[{i + 1}] {n}" + ("" if n.endswith(".") else ".") for i, n in enumerate(notes)]]
    return "\n".join(out)


def write_table(doc: Path, table: str) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        text = text.rstrip("\n") + "\n" + SECTION
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    doc.write_text(f"{before}{START}\n{table}\n{END}{after}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, help="read this pytest --junitxml report instead of running the tests")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "byo.md")
    args = parser.parse_args(argv)
    junit, machine = args.junit, ""
    if junit is None:
        junit = Path(tempfile.mkdtemp(prefix="zoo-matrix-")) / "junit.xml"
        machine = run_tests(junit)
    if not junit.exists():
        print(f"zoo_matrix: no test report at {junit}", file=sys.stderr)
        return 2
    cells, seconds, total = read_results(junit)
    if not cells:
        print(f"zoo_matrix: {junit} has no zoo matrix results", file=sys.stderr)
        return 2
    table = render(cells, seconds, total, machine)
    write_table(args.doc, table)
    print(table)
    return int(any(c.startswith("**FAIL") for row in cells.values() for c in row.values()))


if __name__ == "__main__":
    sys.exit(main())
