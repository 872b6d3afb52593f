"""Run configuration schema: YAML -> pydantic models with unknown keys rejected, plus ``-o a.b=c`` overrides.

One schema for every run: a plain training run, or a continual run when ``data.scenario`` is set. This module knows
nothing about methods, models or datasets: the engine (``kbricks.engine.experiment.build_config``) checks names and
``method.*`` keys against the registries, so a typo anywhere fails with the full key path, e.g.
``method.temprature: unknown key``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .errors import ConfigError


def normalization_problem(mean: Sequence[float], std: Sequence[float]) -> Optional[str]:
    """What is wrong with input statistics ``(x - mean) / std`` (one value per channel or feature, or one for all), or
    None. A NaN, infinite or non-positive std (or a non-finite mean) would turn every input into NaN or inf, and the
    run would then blame the learning rate."""
    mean, std = list(mean), list(std)
    if not mean or not std:
        return "normalize needs at least one mean and one std"
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        return f"normalize: mean has {len(mean)} values but std has {len(std)}"
    bad_std = [s for s in std if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0)]
    if bad_std:
        return f"normalize: std must be finite positive numbers, got {bad_std[0]!r} in {std}; give each channel's standard deviation"
    bad_mean = [m for m in mean if not (isinstance(m, (int, float)) and math.isfinite(m))]
    if bad_mean:
        return f"normalize: mean must be finite numbers, got {bad_mean[0]!r} in {mean}; give each channel's mean"
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TasksConfig(Strict):
    """Exactly one of: ``split`` (k consecutive class groups), ``partition`` (explicit class lists),
    ``latents`` (one task per named latent factor, e.g. dSprites)."""

    split: Optional[int] = Field(None, ge=1)
    partition: Optional[List[List[int]]] = None
    latents: Optional[List[str]] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "TasksConfig":
        given = [k for k in ("split", "partition", "latents") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of split / partition / latents (got {given or 'none'})")
        return self


class AugmentConfig(Strict):
    crop_padding: int = Field(0, ge=0)
    hflip: bool = False
    normalize: bool = True  # per-channel mean/std measured on the training set


class ScenarioConfig(BaseModel):
    """A continual scenario over the dataset: ``name`` (permuted, rotated, split, ...) plus that scenario's own
    arguments (``num_tasks``, ``degrees_per_task``, ``seed`` ...), checked against its signature by the engine."""

    model_config = ConfigDict(extra="allow")
    name: str

    def kwargs(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(Strict):
    name: str
    root: Optional[str] = None
    kwargs: Dict[str, Any] = Field(default_factory=dict)
    tasks: Optional[TasksConfig] = None
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train_subset: Optional[int] = Field(None, ge=1, description="keep the first N training samples (after the seeded split)")
    scenario: Optional[ScenarioConfig] = Field(None, description="continual learning: the sequence of tasks")
    relabel: bool = Field(False, description="map the distinct labels present (sorted) to 0..K-1; without it labels "
                                            "must already use every class 0..K-1")


class ModelConfig(Strict):
    name: str
    kwargs: Dict[str, Any] = Field(default_factory=dict)
    head: Optional[str] = Field(None, description="a user network's classifier layer, when running it once cannot tell")
    features: Optional[str] = Field(None, description="a user network's feature layer ('<layer>' or '<layer>:input')")

    @model_serializer(mode="wrap")
    def _without_unset_layers(self, handler):  # configs and cards without head / features stay as they were
        return {k: v for k, v in handler(self).items() if k not in ("head", "features") or v is not None}

    def layers(self) -> Dict[str, str]:
        """``head`` / ``features`` when set, as keyword arguments of ``models.create_model``."""
        return {k: v for k, v in (("head", self.head), ("features", self.features)) if v is not None}


class MethodConfig(BaseModel):
    """``name`` picks the method; the other keys are that method's own options (validated by it)."""

    model_config = ConfigDict(extra="allow")
    name: str = "supervised"

    def params(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    milestones: List[int] = Field(default_factory=list, description="epochs at which the step schedule multiplies lr by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    scale_lr_with_world_size: bool = False  # linear scaling rule for DDP

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: List[int]) -> List[int]:
        if any(m < 1 for m in v) or v != sorted(set(v)):
            raise ValueError("milestones must be strictly increasing epoch numbers >= 1")
        return v


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="per process")
    eval_batch_size: int = Field(512, ge=1)
    eval_every: int = Field(1, ge=0, description="evaluate every N epochs (the last epoch always); 0 = only after the last epoch")
    checkpoint_every: int = Field(1, ge=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    device: str = "auto"
    deterministic: bool = False
    num_threads: Optional[int] = Field(None, ge=1)
    progress: Literal["auto", "on", "off"] = "auto"
    plots: bool = True
    loggers: List[Literal["tensorboard"]] = Field(default_factory=list, description="extra loggers beside metrics.jsonl: "
                                                  "tensorboard writes event files to <run>/tb (scalars and the plots)")
    ddp_timeout_s: float = Field(1800.0, gt=0, description="how long DDP ranks wait for a stopped rank")
    sync_batchnorm: bool = Field(False, description="DDP: BatchNorm statistics over the global batch")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast the training step (fp16 adds a gradient scaler on CUDA)")
    channels_last: bool = Field(False, description="4-D weights and inputs in channels-last memory format")
    compile: bool = Field(False, description="torch.compile the training step; falls back to eager (with a warning) where it fails")

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):  # YAML reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class InferenceConfig(Strict):
    """Continual runs: inference when the task id is missing (SupSup's GN setting; ImpressLearn's re-fit)."""

    images: List[int] = Field(default_factory=lambda: [1, 16], description="images per inference batch")
    trials_per_task: int = Field(200, ge=1, description="random test batches per task and batch size")
    methods: List[Literal["one_shot", "binary", "refit_uniform", "refit_nearest"]] = Field(
        default_factory=lambda: ["one_shot", "binary"], description="SupSup's rules; refit_*: ImpressLearn re-fits its coefficients")
    objective: Literal["entropy", "g"] = Field("entropy", description="what SupSup's rules minimise (g: superfluous outputs)")
    first_image: bool = Field(True, description="also: is each task identified from its first test image alone (SupSup notebook)")
    refit_steps: int = Field(25, ge=1, description="refit: Adam steps of entropy minimisation on the batch")
    refit_lr: float = Field(0.01, gt=0)
    refit_trials_per_task: Optional[int] = Field(None, ge=1, description="refit: trials per task (default: trials_per_task)")


class RunConfig(Strict):
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: Optional[InferenceConfig] = Field(None, description="continual runs only")

    @model_validator(mode="after")
    def _inference_only_for_continual(self) -> "RunConfig":
        if self.inference is not None and self.data.scenario is None:
            raise ValueError("inference: task inference needs a continual run (set data.scenario)")
        return self

    @property
    def is_continual(self) -> bool:
        return self.data.scenario is not None

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(err["loc"]))
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            got = err.get("input")
            text = err["msg"].removeprefix("Value error, ")  # our validators' own one-line messages
            msg = f"{text} (got {got!r})" if not isinstance(got, dict) and err["type"] != "value_error" else text
        lines.append(f"{path or '<root>'}: {msg}")
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key, value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} is not a file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config was expected)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_config(data: Dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """The schema only: structure, types and unknown keys. Use ``kbricks.build_config`` for a fully checked config."""
    merged = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None

