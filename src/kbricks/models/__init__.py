"""Model zoo and network building blocks: ``create_model(name, num_classes=..., in_channels=..., image_size=...)``.

Every network class lives here (classifiers, heads, factorized KF networks, supermask layers, frozen teachers);
methods import models, never the reverse.
"""

from ..data.base import input_shape_of
from . import gem_resnet, masked, mobilenetv2, resnet, simple, wrn  # noqa: F401  (registers models)
from .base import MODELS, Classifier, count_parameters
from .foreign import NetworkSpec, build_backbone, check_built, looks_like_network
from .heads import MultiHeadClassifier


def create_model(name: str, **kwargs) -> Classifier:
    """A registered model, or a user network named by a spec string (a kbricks run, a TorchScript file, an import path
    ``package.module:factory``, an API object): see :func:`models.foreign.build_backbone`. With the data's shape
    arguments, one zero batch checks that the model takes that shape and predicts ``num_classes`` outputs."""
    if name not in MODELS and looks_like_network(name):
        return build_backbone(name, **kwargs)
    net = MODELS.create(name, **kwargs)
    if all(k in kwargs for k in ("num_classes", "in_channels", "image_size")):
        check_built(net, name, kwargs["num_classes"], input_shape_of(kwargs["in_channels"], kwargs["image_size"]))
    return net


def list_models(pattern: str = "*", tag=None):
    """Registered model names, filtered by a shell-style wildcard (``list_models("resnet*")``) and a tag
    (``list_models(tag="masked")``)."""
    return MODELS.names(pattern, tag)


__all__ = ["Classifier", "MODELS", "MultiHeadClassifier", "NetworkSpec", "create_model", "list_models", "count_parameters"]
