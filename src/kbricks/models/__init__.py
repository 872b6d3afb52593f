"""Model zoo: ``create_model(name, num_classes=..., in_channels=..., image_size=..., **kwargs)``."""

from . import masked, mobilenetv2, resnet, simple, wrn  # noqa: F401  (registers models)
from .base import MODELS, Classifier, count_parameters


def create_model(name: str, **kwargs) -> Classifier:
    return MODELS.create(name, **kwargs)


def list_models(pattern: str = "*"):
    """Registered model names, filtered by a shell-style wildcard (``list_models("resnet*")``)."""
    return MODELS.names(pattern)


__all__ = ["Classifier", "MODELS", "create_model", "list_models", "count_parameters"]
