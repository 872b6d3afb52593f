"""Every Python and shell code block in README.md and docs/*.md is checked, so the docs cannot drift from the code.

Each block is preceded by a marker comment that says how it is checked:

- ``<!-- doc-test: run -->`` (Python): executed, in a fresh namespace, in a temporary directory. Names a block uses
  without defining them (``teacher``, ``x_train``, ``MyNet`` ...) come from :data:`GIVEN`: tiny networks and data,
  so a block that trains for its real budget finishes in seconds.
- ``<!-- doc-test: run after=previous -->``: executed in the namespace left by the previous ``run`` block of the
  same file (its models, datasets, files), in the same directory.
- ``<!-- doc-test: parse -->`` (shell): every ``kbricks ...`` command (also behind ``torchrun ... -m kbricks``) is
  parsed by the real command-line parser, and every repository path it names (configs/, examples/) exists.
- ``<!-- doc-test: skip (reason) -->``: not checked; the reason says why (e.g. it trains for hours).

A block without a marker fails the test, so a new block has to choose.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*doc-test:\s*(run|parse|skip)\b(.*?)-->")
FENCE = re.compile(r"^```(\w*)\s*$")


class Block(NamedTuple):
    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str  # run | parse | skip | "" (no marker)
    arg: str

    @property
    def name(self) -> str:
        return f"{self.file.name}:{self.line}"


def blocks_of(path: Path) -> List[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        lang = m.group(1).lower()
        if lang in ("python", "py", "bash", "sh", "shell", "console"):
            above = "\n".join(lines[max(0, i - 3):i])
            marks = MARKER.findall(above)
            mode, arg = marks[-1] if marks else ("", "")
            out.append(Block(path, i + 1, "python" if lang in ("python", "py") else "shell", "\n".join(lines[i + 1:j]),
                             mode, arg.strip()))
        i = j + 1
    return out


BLOCKS = [b for doc in DOCS for b in blocks_of(doc)]


def test_every_code_block_says_how_it_is_checked():
    unmarked = [b.name for b in BLOCKS if not b.mode]
    assert not unmarked, f"code blocks without a <!-- doc-test: run|parse|skip (reason) --> marker: {unmarked}"
    no_reason = [b.name for b in BLOCKS if b.mode == "skip" and not re.search(r"\(\s*\S.*\)", b.arg)]
    assert not no_reason, f"skipped blocks must give a reason in parentheses: {no_reason}"
    wrong = [b.name for b in BLOCKS if (b.mode == "run" and b.lang != "python") or (b.mode == "parse" and b.lang != "shell")]
    assert not wrong, f"run is for Python blocks, parse for shell blocks: {wrong}"


def test_the_marker_parser_sees_markers_and_missing_ones(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- doc-test: skip (trains for hours) -->\n```bash\nkbricks x\n```\n\n```python\nprint(1)\n```\n")
    first, second = blocks_of(doc)
    assert (first.mode, first.arg, first.lang, first.line) == ("skip", "(trains for hours)", "shell", 2)
    assert second.mode == "" and second.code == "print(1)"


# ---- shell blocks: parsed by the real CLI ---------------------------------------------------------------------


def commands_of(code: str) -> List[List[str]]:
    """``kbricks`` argument lists of a shell block (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments before the command
            words = words[1:]
        if "kbricks" not in words:
            continue
        k = words.index("kbricks")
        if k > 0 and words[k - 1] != "-m":
            continue
        out.append(words[k + 1:])
    return out


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "parse"], ids=lambda b: b.name)
def test_shell_blocks_parse(block):
    from kbricks.cli import build_parser

    commands = commands_of(block.code)
    assert commands, f"{block.name}: a parse block with no kbricks command"
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"{block.name}: `kbricks {' '.join(argv)}` does not parse (exit {exc.code})")
        for word in argv:
            for token in re.split(r"[=,\s{}\[\]]+", word):
                if re.match(r"^(configs|examples)/\S+\.(ya?ml|py)$", token):
                    assert (REPO / token).exists(), f"{block.name}: {token} does not exist"


# ---- Python blocks: executed on tiny stand-ins -----------------------------------------------------------------


def _tiny_data(n: int = 96, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
    x[torch.arange(n), 0, y % 8, y // 8 * 2] += 1.0  # a learnable signal: one bright pixel per class
    return x.clamp(0, 1), y


class _TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, **_):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def given() -> Dict[str, object]:
    """The names doc blocks use without defining them: tiny, fast stand-ins of the reader's own objects."""
    x_train, y_train = _tiny_data(96, seed=0)
    x_test, y_test = _tiny_data(48, seed=1)
    x, y = _tiny_data(640, seed=2)  # enough for five continual tasks of one batch each
    teacher = _TinyNet()
    return {"teacher": teacher.eval(), "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "x": x, "y": y, "x_raw": x_test, "MyNet": _TinyNet, "MyBackbone": _TinyNet,
            "src_a": _TinyNet().eval(), "src_b": _TinyNet().eval(), "torch": torch, "nn": nn}


_namespaces: Dict[str, dict] = {}


def _run_block(block: Block, tmp_path_factory, monkeypatch) -> dict:
    """Execute ``block`` (after its predecessor, run here first if this process has not run it: pytest-xdist may
    have sent it elsewhere) and keep its namespace."""
    from kbricks.core.plots import wait_for_plots

    if block.name in _namespaces:
        return _namespaces[block.name]
    if "after=previous" in block.arg:
        runs = [b for b in BLOCKS if b.file == block.file and b.mode == "run" and b.line < block.line]
        assert runs, f"{block.name}: after=previous, but no run block comes before it in {block.file.name}"
        ns = _run_block(runs[-1], tmp_path_factory, monkeypatch)
        monkeypatch.chdir(ns["__docdir__"])
    else:
        work = tmp_path_factory.mktemp(block.name.replace(".", "_").replace(":", "_"))
        monkeypatch.chdir(work)
        ns = {**given(), "__docdir__": work, "__name__": f"doc_{block.file.stem}"}
    try:
        exec(compile(block.code, block.name, "exec"), ns)  # noqa: S102 - the repository's own docs
    finally:
        wait_for_plots()  # drawn on a background thread, into this block's directory
    _namespaces[block.name] = ns
    return ns


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "run"], ids=lambda b: b.name)
def test_python_blocks_run(block, tmp_path_factory, monkeypatch):
    _run_block(block, tmp_path_factory, monkeypatch)
