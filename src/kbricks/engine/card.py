"""The model card: ``model.json`` next to ``model.safetensors``, one schema for plain and continual runs.

Keys (every card has all of them):

* ``kbricks``: the version that wrote it; ``model``, ``method``, ``data``: the config's names (and model kwargs);
* ``network``: what ``model.safetensors`` rebuilds: ``classifier`` (one network over the data's classes or task
  heads), ``supermask`` / ``dense`` (a continual strategy's state), or what the method's :meth:`Method.card` says
  (KF: ``factors``, load the bricks instead);
* ``scenario``: the continual scenario (``None`` for plain runs);
* ``num_classes``, ``classes``, ``in_channels``, ``image_size``, ``normalize``, ``tasks``: how to feed it and read it
  (continual runs: ``num_classes`` is the largest task's, ``classes`` is ``None``);
* ``imports``: the plugin modules (``--import``, or outside kbricks and registering a name the run uses) that
  ``kbricks evaluate`` / ``export`` import again before rebuilding;
* ``fingerprint`` of the weights, and ``metrics`` (the run's results);
* ``signature`` and ``claim_digests``: every other field is a claim signed with the weights' fingerprint
  (:func:`kbricks.models.card.sign_card`); a loader refuses a card edited after training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .._version import __version__
from ..config import RunConfig
from ..core.checkpoint import fingerprint, save_safetensors
from ..core.rundir import RunDirectory
from ..data import DATASETS, SCENARIOS
from ..errors import ConfigError
from ..methods.base import METHODS, Method
from ..models import MODELS
from ..models.card import sign_card, verify_card
from ..registry import import_user_modules, imported_modules

CARD_KEYS = ("kbricks", "model", "method", "network", "data", "scenario", "num_classes", "classes", "in_channels", "image_size",
             "normalize", "tasks", "imports", "fingerprint", "metrics", "signature", "claim_digests")


def plugin_modules(cfg: RunConfig) -> List[str]:
    """Modules a later process must import to rebuild this run: every ``--import`` module, then the modules outside
    kbricks that define the run's dataset, scenario, model or method."""
    out = list(imported_modules())
    used = [(DATASETS, cfg.data.name), (MODELS, cfg.model.name), (METHODS, cfg.method.name)]
    if cfg.data.scenario is not None:
        used.append((SCENARIOS, cfg.data.scenario.name))
    for registry, name in used:
        if name in registry:
            module = getattr(registry.get(name), "__module__", None)
            if module and module.split(".")[0] != "kbricks" and module not in ("__main__", "__mp_main__") and module not in out:
                out.append(module)
    return out


def write_model_card(run: RunDirectory, exp, method: Method, tensors: Dict[str, torch.Tensor], weights_format: str, network: str,
                     metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``model.safetensors`` (``tensors``) and ``model.json`` describing them; returns the card. ``exp`` is the
    run's :class:`~kbricks.engine.experiment.Experiment`; ``network`` the default kind, which ``method.card()`` may
    override or extend."""
    cfg = exp.cfg
    save_safetensors(tensors, run.path / "model.safetensors", {"format": weights_format})
    continual = exp.scenario is not None
    if continual:
        train = exp.scenario[0].train  # every task is normalised with the first task's statistics
        tasks = [{"name": t.name, "num_classes": t.num_classes} for t in exp.scenario]
        num_classes, classes = max(t["num_classes"] for t in tasks), None
    else:
        train = exp.data.train
        tasks = [t.to_dict() for t in exp.tasks]
        num_classes, classes = train.num_classes, train.classes
    card = {
        "kbricks": __version__,
        "model": cfg.model.model_dump(),
        "method": cfg.method.name,
        "network": network,
        "data": cfg.data.name,
        "scenario": cfg.data.scenario.model_dump() if continual else None,
        "num_classes": num_classes,
        "classes": classes,
        "in_channels": train.in_channels,
        "image_size": train.image_size,
        "normalize": {"mean": exp.transform.mean, "std": exp.transform.std},
        "tasks": tasks,
        "imports": plugin_modules(cfg),
        "fingerprint": fingerprint(tensors),
        "metrics": metrics,
    }
    card.update(method.card())
    card = sign_card(card)  # last: the method's fields are claims too
    run.write_json("model.json", card)
    return card


def recorded_imports(run_dir: Path) -> List[str]:
    """The plugin modules a run recorded: its model card's ``imports``, else (a run still training) its env.json's."""
    for name in ("model.json", "env.json"):
        path = Path(run_dir) / name
        if path.exists():
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("imports"), list):
                if name == "model.json":  # never import modules an edited card names
                    verify_card(doc, path)
                return [str(m) for m in doc["imports"]]
    return []


def import_recorded(run_dir: Path, modules: Optional[List[str]] = None) -> None:
    """Import the plugin modules ``run_dir`` was trained with (or ``modules``), with a one-line error naming the fix."""
    modules = recorded_imports(run_dir) if modules is None else modules
    for name in modules:
        try:
            import_user_modules([name])
        except ConfigError as exc:
            raise ConfigError(f"{run_dir} was trained with plugin module {name!r} (recorded in its model card), which cannot be "
                              f"imported here ({str(exc).split(': ', 1)[-1]}); run from the directory that holds it, or install it") from None
