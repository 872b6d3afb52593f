"""Write the wall time of `make demo` (started at argv[1], epoch seconds) to runs/demo/demo-time.json and print it."""

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

start, load_before, workers, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3] or "auto", Path(sys.argv[4])
wall = time.time() - start
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
record = {"wall_s": round(wall, 1), "workers": workers if workers != "auto" else os.cpu_count(), "cores": os.cpu_count(),
          "load_before": load_before, "load_after": os.getloadavg()[0], "date": datetime.datetime.now().isoformat(timespec="minutes"),
          "commit": commit}
out.write_text(json.dumps(record, indent=2) + "\n")
print(f"[demo] wall time {wall / 60:.1f} min ({record['workers']} workers on {record['cores']} cores; "
      f"1-min load average {load_before:.1f} at the start, {record['load_after']:.1f} at the end) -> {out}")
