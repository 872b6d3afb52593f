"""kbricks: modular knowledge transfer between neural networks (KF, SupSup/ImpressLearn, SSKT and baselines).

The public API, in a few names (see docs/api.md)::

    cfg = kbricks.load_config("configs/kf/digits.yaml", ["seed=1"])   # or kbricks.build_config({...})
    summary = kbricks.train(cfg, run_dir="runs/kf-digits")           # any method; continual configs too
    net = kbricks.assemble("runs/kf-digits/bricks/ckn.json", [...])  # bricks -> one network, no fine-tuning
    report = kbricks.evaluate("runs/kf-digits")
"""

from ._version import __version__
from .engine.evaluate import evaluate_run as evaluate
from .engine.experiment import build_config, load_config
from .engine.trainer import run_training as train
from .errors import CheckpointError, ConfigError, DataError, KbricksError, TrainingDiverged
from .methods.kf.bricks import assemble, load_brick, save_assembled

__all__ = [
    "__version__", "assemble", "build_config", "evaluate", "load_brick", "load_config", "save_assembled", "train",
    "CheckpointError", "ConfigError", "DataError", "KbricksError", "TrainingDiverged",
]
