"""kbricks: modular knowledge transfer between neural networks (KF, SupSup/ImpressLearn, SSKT and baselines).

The public API, in a few names (see docs/api.md)::

    cfg = kbricks.load_config("configs/kf/digits.yaml", ["seed=1"])   # or kbricks.build_config({...})
    summary = kbricks.train(cfg, run_dir="runs/kf-digits")           # any method; continual configs too
    net = kbricks.assemble("runs/kf-digits/bricks/ckn.json", [...])  # bricks -> one network, no fine-tuning
    report = kbricks.evaluate("runs/kf-digits")
    kbricks.save_assembled(net, "runs/asm"); net = kbricks.load_assembled("runs/asm")  # takes raw inputs
    student = kbricks.load_model("runs/kd-digits")                   # a run's network, taking raw inputs
    kbricks.export(net, "asm.onnx", format="onnx")                   # or "torchscript"; checked against PyTorch
"""

from ._version import __version__
from .engine.evaluate import evaluate_run as evaluate
from .engine.experiment import build_config, load_config
from .engine.export import export
from .engine.trainer import run_training as train
from .errors import CheckpointError, ConfigError, DataError, KbricksError, TrainingDiverged
from .methods.kf.bricks import assemble, load_assembled, load_brick, save_assembled
from .models.deploy import load_model

__all__ = [
    "__version__", "assemble", "build_config", "evaluate", "export", "load_assembled", "load_brick", "load_config", "load_model",
    "save_assembled", "train",
    "CheckpointError", "ConfigError", "DataError", "KbricksError", "TrainingDiverged",
]
