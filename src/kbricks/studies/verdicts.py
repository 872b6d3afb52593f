"""Claims and verdicts: each claim names the paper's statement, extracts our number from a study's raw results
(mean +/- std over seeds) and applies a verdict rule written down before the numbers are seen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

Verdict = Tuple[str, str]  # (verdict, our number as text)


@dataclass
class Claim:
    area: str
    paper: str
    check: Callable[[Path], Optional[Verdict]]


def grade(ok_all: bool, ok_mean: bool) -> str:
    return "holds" if ok_all else ("partly" if ok_mean else "does not hold")


