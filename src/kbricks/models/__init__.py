"""Model zoo and network building blocks: ``create_model(name, num_classes=..., in_channels=..., image_size=...)``.

Every network class lives here (classifiers, heads, factorized KF networks, supermask layers, frozen teachers);
methods import models, never the reverse. User networks: ``spec`` (how they are named), ``open`` (the one dispatch,
``create_model``), ``taps`` (features and heads found by execution), ``_factory`` (factories and the timm /
torchvision zoos: :func:`zoo`).
"""

from . import gem_resnet, masked, mobilenetv2, resnet, simple, wrn  # noqa: F401  (registers models)
from ._factory import ZooFactory, zoo
from .base import MODELS, Classifier, count_parameters
from .heads import MultiHeadClassifier
from .open import build_backbone, create_model, open_spec
from .spec import NetworkSpec
from .taps import FeatureTap, find_head


def list_models(pattern: str = "*", tag=None):
    """Registered model names, filtered by a shell-style wildcard (``list_models("resnet*")``) and a tag
    (``list_models(tag="masked")``)."""
    return MODELS.names(pattern, tag)


__all__ = ["Classifier", "FeatureTap", "MODELS", "MultiHeadClassifier", "NetworkSpec", "ZooFactory", "build_backbone",
           "count_parameters", "create_model", "find_head", "list_models", "open_spec", "zoo"]
