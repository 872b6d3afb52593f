"""Put the current claims table (from the committed study.json files) between the README's results markers.

Run by `make readme`; the library itself never writes README.md.
"""

import sys
from pathlib import Path

from kbricks.studies import readme_summary

START, END = "<!-- results:start -->", "<!-- results:end -->"


def main(readme: Path = Path("README.md"), runs: Path = Path("results/runs")) -> int:
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme}: no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{readme_summary(runs)}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
