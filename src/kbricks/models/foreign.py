"""Former home of the network spec and its loaders, kept so old imports keep working. The code now lives by job:
``models.spec`` (the schema), ``models._files`` (TorchScript / weights files), ``models._factory`` (calling
factories, the timm / torchvision zoos), ``models.adapter`` (input conversion), ``models.taps`` (features and heads
by execution), ``models.wrappers`` (user networks as kbricks modules), ``models.open`` (the one dispatch)."""

from ._factory import accepted_args, call_factory, import_object, zoo  # noqa: F401
from ._files import is_torchscript_archive, load_torchscript, load_weights  # noqa: F401
from ._probe import check_built, output_classes, probe  # noqa: F401
from .adapter import InputAdapter  # noqa: F401
from .open import Opened, build_backbone, check_network_name, open_spec  # noqa: F401
from .spec import IMPORT_PATH, InputSpec, NetworkRef, NetworkSpec, NormalizeSpec, as_spec, looks_like_network, path_kind  # noqa: F401
from .taps import FeatureTap, find_head  # noqa: F401
from .wrappers import CallableNetwork, ForeignClassifier  # noqa: F401
