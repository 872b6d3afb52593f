"""Model zoo and network building blocks: ``create_model(name, num_classes=..., in_channels=..., image_size=...)``.

Every network class lives here (classifiers, heads, factorized KF networks, supermask layers, frozen teachers);
methods import models, never the reverse.
"""

from . import gem_resnet, masked, mobilenetv2, resnet, simple, wrn  # noqa: F401  (registers models)
from .base import MODELS, Classifier, count_parameters
from .heads import MultiHeadClassifier


def create_model(name: str, **kwargs) -> Classifier:
    return MODELS.create(name, **kwargs)


def list_models(pattern: str = "*", tag=None):
    """Registered model names, filtered by a shell-style wildcard (``list_models("resnet*")``) and a tag
    (``list_models(tag="masked")``)."""
    return MODELS.names(pattern, tag)


__all__ = ["Classifier", "MODELS", "MultiHeadClassifier", "create_model", "list_models", "count_parameters"]
