"""`make bench`: every performance ratio the project reports, measured side by side in one run."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import bench_kf  # noqa: E402
import bench_supermask  # noqa: E402
import torch  # noqa: E402

BENCHES = {"kf_step": bench_kf.main, "supermask_eval": bench_supermask.main}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    results = {name: fn() for name, fn in BENCHES.items()}
    out = Path("results") / "bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}, indent=2))
    lines = ["# Benchmarks", "", f"`make bench`, torch {torch.__version__}, {torch.get_num_threads()} threads. "
             "Candidates are timed interleaved in one process (median of rounds); ratios are to the first row of each block.", ""]
    for bench, blocks in results.items():
        for block, vals in blocks.items():
            lines += [f"## {bench}: {block}", "", "| candidate | ms | ratio |", "|---|---|---|"]
            for k in [k for k in vals if k.endswith("/ms")]:
                name = k[:-3]
                lines.append(f"| {name} | {vals[k]:.2f} | {vals[name + '/ratio']:.2f}x |")
            lines.append("")
    (out.parent / "bench.md").write_text("\n".join(lines))
    print(f"\nwritten {out} and {out.parent / 'bench.md'}")


if __name__ == "__main__":
    main()
