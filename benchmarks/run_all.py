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
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
