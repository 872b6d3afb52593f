import pytest

from kbricks.errors import ConfigError
from kbricks.registry import Registry, UnknownNameError


def test_register_create_and_wildcards():
    reg = Registry("widget")

    @reg.register("alpha_one")
    def alpha_one(size: int = 1):
        return ("a1", size)

    @reg.register()
    def beta(size: int = 2):
        return ("b", size)

    assert reg.create("alpha_one", size=5) == ("a1", 5)
    assert reg.create("beta") == ("b", 2)
    assert reg.names() == ["alpha_one", "beta"]
    assert reg.names("alpha*") == ["alpha_one"]
    assert "beta" in reg and "gamma" not in reg


def test_duplicate_name_refused():
    reg = Registry("widget")
    reg.register("x")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(lambda: 2)


def test_unknown_name_lists_valid_ones():
    reg = Registry("widget")
    reg.register("x")(lambda: 1)
    reg.register("y")(lambda: 1)
    with pytest.raises(UnknownNameError) as info:
        reg.get("z")
    assert str(info.value) == "unknown widget 'z'; valid widgets: x, y"


def test_unknown_kwarg_lists_accepted_ones():
    reg = Registry("widget")

    @reg.register("x")
    def x(depth: int = 1, width: int = 2):
        return depth

    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['dpeth'\]; accepted: \['depth', 'width'\]"):
        reg.create("x", dpeth=3)


def test_global_registries_hold_the_documented_names():
    from kbricks.data import list_datasets
    from kbricks.methods import list_methods
    from kbricks.models import list_models

    assert {"mlp", "small_cnn", "resnet20", "resnet32", "resnet56", "resnet18", "wrn28_2", "mobilenetv2"} <= set(list_models())
    assert list_models("resnet*") == ["resnet18", "resnet20", "resnet32", "resnet56", "resnet8"]
    assert {"digits", "mnist5k", "dsprites", "cifar10", "cifar100", "imagefolder", "npz", "mnist_idx"} <= set(list_datasets())
    assert "supervised" in list_methods()
