"""Run by tests/test_robustness.py: the kbricks CLI in its own process, paused mid-training so that the test can
start a second process on the same run directory, ``kill -9`` it or send it SIGINT.

    python robust_worker.py MARKER EPOCH STEP -- <kbricks arguments>

Before step STEP (1-based) of epoch EPOCH (1-based) returns, the process writes its pid to MARKER and sleeps.
EPOCH 0 never pauses. ROBUST_STAMP=<stamp> fixes the time stamp of default run directory names.
"""

import os
import sys
import time
from pathlib import Path

import torch

from kbricks.cli import main
from kbricks.core.hooks import Hook
from kbricks.engine import trainer as trainer_module

marker, pause_epoch, pause_step = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
args = sys.argv[sys.argv.index("--") + 1:]
torch.set_num_threads(1)


class Pause(Hook):
    epoch = 0

    def on_epoch_start(self, trainer, epoch):
        self.epoch = epoch + 1

    def on_step_end(self, trainer, step, losses):
        if self.epoch == pause_epoch and step + 1 == pause_step:
            marker.write_text(str(os.getpid()))
            time.sleep(120)


original_init = trainer_module.Trainer.__init__


def init_with_pause(self, exp, run, hooks=None):
    original_init(self, exp, run, [*(hooks or []), Pause()])


trainer_module.Trainer.__init__ = init_with_pause
if os.environ.get("ROBUST_STAMP"):  # start "in the same second" as another run: a fixed time stamp
    from kbricks.core import rundir

    rundir._stamp = lambda: os.environ["ROBUST_STAMP"]
sys.exit(main(args))
