"""kbricks: modular knowledge transfer between neural networks (KF, SupSup/ImpressLearn, SSKT and baselines).

The public API, in a few names (see docs/api.md). Your own networks and data, straight from Python::

    fac = kbricks.factorize(my_teacher, (x, y), test=(x_test, y_test), tasks=2)   # -> run dir, bricks, networks
    net = fac.assemble()                                                          # bricks -> one network
    run = kbricks.distill((x, y), method="kd", teacher=my_teacher, student=MyStudent)
    cl = kbricks.learn_continually(MyBackbone, (x, y), scenario="split", num_tasks=5)

Config files (teachers, sources and models may be kbricks runs, TorchScript files or import paths; docs/byo.md)::

    cfg = kbricks.load_config("configs/kf/digits.yaml", ["seed=1"])   # or kbricks.build_config({...})
    summary = kbricks.train(cfg, run_dir="runs/kf-digits")           # any method; continual configs too
    net = kbricks.assemble("runs/kf-digits/bricks/ckn.json", [...])  # bricks -> one network, no fine-tuning
    net = kbricks.assemble(store="runs", classes=["cat", "dog", 7])  # or the fewest bricks that cover these classes
    found = kbricks.scan_bricks("runs").search(classes=["cat"])      # the brick catalog (kbricks bricks list|show|search)
    report = kbricks.evaluate("runs/kf-digits")
    kbricks.save_assembled(net, "runs/asm"); net = kbricks.load_assembled("runs/asm")  # takes raw inputs
    student = kbricks.load_model("runs/kd-digits")                   # a run's network, taking raw inputs
    kbricks.export(net, "asm.onnx", format="onnx")                   # or "torchscript"; checked against PyTorch
"""

from ._version import __version__
from .api import ContinualRun, Factorization, Run, TaskFreePrediction, accuracy, distill, extend, factorize, learn_continually
from .engine.evaluate import evaluate_run as evaluate
from .engine.experiment import build_config, load_config
from .engine.export import export
from .engine.run import run_training as train
from .errors import CheckpointError, ConfigError, DataError, KbricksError, TrainingDiverged
from .methods.kf.bricks import load_assembled, load_brick, save_assembled
from .methods.kf.catalog import assemble
from .methods.kf.catalog import choose as choose_bricks
from .methods.kf.catalog import scan as scan_bricks
from .models._factory import zoo
from .models.deploy import load_model
from .models.foreign import NetworkSpec
from .models.supermask import supermask

__all__ = [
    "__version__", "assemble", "build_config", "evaluate", "export", "load_assembled", "load_brick", "load_config", "load_model",
    "save_assembled", "train", "scan_bricks", "choose_bricks",
    "factorize", "extend", "distill", "learn_continually", "accuracy", "supermask", "zoo", "NetworkSpec", "Run", "Factorization", "ContinualRun", "TaskFreePrediction",
    "CheckpointError", "ConfigError", "DataError", "KbricksError", "TrainingDiverged",
]
