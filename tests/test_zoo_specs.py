"""timm / torchvision networks by name ("timm:resnet18", "torchvision:resnet18", kbricks.zoo(...)), and factories
whose signature is only **kwargs: sized to the data, never downloaded, with one-line errors."""

import functools

import pytest
import torch
from torch import nn

import kbricks
from kbricks.core.checkpoint import save_safetensors
from kbricks.errors import ConfigError
from kbricks.models import create_model
from kbricks.models.frozen import load_frozen
from kbricks.models.open import check_network_name
from kbricks.models.spec import as_spec, path_kind
from kbricks.registry import OBJECTS

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _out(net, shape):
    net.eval()
    with torch.no_grad():
        return net(torch.rand(2, *shape))


def test_zoo_spec_strings_build_sized_to_the_data():
    assert path_kind("timm:resnet18") == "zoo" and path_kind("torchvision:resnet18") == "zoo"
    net = create_model("timm:resnet18", num_classes=7, in_channels=1, image_size=16)  # in_chans from the data
    assert net.module.conv1.in_channels == 1 and _out(net, (1, 16, 16)).shape == (2, 7)
    net = create_model("torchvision:resnet18", num_classes=5, in_channels=3, image_size=32, zero_init_residual=True)
    assert _out(net, (3, 32, 32)).shape == (2, 5)
    # a ViT takes its image size from the data (timm's img_size); an argument the model refuses is one line
    vit = create_model("timm:vit_tiny_patch16_224", num_classes=4, in_channels=3, image_size=32, depth=1)
    assert _out(vit, (3, 32, 32)).shape == (2, 4) and vit.head_name == "head"
    with pytest.raises(ConfigError, match=r"create_model\('resnet18', pretrained=False, depth=1.*failed: TypeError.*'depth'"):
        create_model("timm:resnet18", num_classes=4, in_channels=3, image_size=32, depth=1)


def test_kbricks_zoo_is_a_factory_sized_where_it_is_used():
    factory = kbricks.zoo("timm:resnet18", drop_rate=0.1)
    assert repr(factory) == "zoo('timm:resnet18', drop_rate=0.1)"
    assert factory(num_classes=3).fc.out_features == 3
    net = create_model(OBJECTS.put(factory, "student"), num_classes=10, in_channels=1, image_size=8)
    assert _out(net, (1, 8, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="timm has no model 'resnet_nope'"):
        kbricks.zoo("timm:resnet_nope")
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet1'"):
        kbricks.zoo("torchvision:resnet1")
    with pytest.raises(ConfigError, match="not a zoo name"):
        kbricks.zoo("resnet18")


@pytest.mark.parametrize("spec, kwargs", [("timm:resnet18", {"pretrained": True}), ("torchvision:resnet18", {"weights": "DEFAULT"}),
                                          ("timm:resnet18", {"checkpoint_path": "x.pth"})])
def test_pretrained_weights_are_refused_in_one_line(spec, kwargs):
    with pytest.raises(ConfigError, match="kbricks never downloads") as err:
        kbricks.zoo(spec, **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="kbricks never downloads"):
        create_model(spec, num_classes=10, in_channels=3, image_size=32, **kwargs)


def test_factories_with_only_kwargs_get_num_classes():
    partial = functools.partial(timm.create_model, "resnet18")
    net = create_model(OBJECTS.put(partial, "student"), num_classes=6, in_channels=1, image_size=16)
    assert _out(net, (1, 16, 16)).shape == (2, 6)
    net = create_model("torchvision.models:resnet18", num_classes=6, in_channels=3, image_size=32)  # an import path
    assert _out(net, (3, 32, 32)).shape == (2, 6)
    with pytest.raises(ConfigError, match="kbricks never downloads"):
        create_model(OBJECTS.put(functools.partial(timm.create_model, "resnet18", pretrained=True), "s"), num_classes=6,
                     in_channels=1, image_size=16)


def test_a_kwargs_factory_that_ignores_num_classes_gets_the_lambda_to_write():
    def build(**kwargs):  # forwards nothing: always 1000 outputs
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 1000))

    with pytest.raises(ConfigError, match=r"outputs 1000 classes but the data have 10: .*build does not size its output from "
                                          r"num_classes.*lambda num_classes: .*build\(") as err:
        create_model(OBJECTS.put(build, "student"), num_classes=10, in_channels=1, image_size=8)
    assert "\n" not in str(err.value)


def test_zoo_spec_as_a_frozen_teacher_with_local_weights(tmp_path):
    trained = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    save_safetensors(trained.state_dict(), tmp_path / "t.safetensors")
    with pytest.raises(ConfigError, match="timm:resnet18 is a zoo model: state its input convention"):
        as_spec("timm:resnet18", "method.teacher")
    x = torch.rand(3, 1, 16, 16)
    spec = {"path": "timm:resnet18", "kwargs": {"num_classes": 10, "in_chans": 1}, "weights": str(tmp_path / "t.safetensors"),
            "normalize": "none"}
    teacher = load_frozen(spec, None, x, "method.teacher")
    with torch.no_grad():
        assert torch.allclose(teacher(x), trained(x), atol=1e-5)
    assert teacher.num_outputs == 10 and teacher.features(x).shape == (3, 512)


def test_zoo_names_are_checked_at_config_time_and_need_their_package(monkeypatch):
    check_network_name("timm:resnet18", {"drop_rate": 0.1}, "model.name")
    with pytest.raises(ConfigError, match="timm has no model"):
        check_network_name("timm:resnet_nope", {}, "model.name")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ConfigError, match="needs the timm package: pip install timm"):
        kbricks.zoo("timm:resnet18")


def test_a_zoo_student_trains_from_a_spec_string(tmp_path):
    from kbricks.data import load_dataset

    d = load_dataset("digits")
    run = kbricks.distill((d.train.x[:64], d.train.y[:64]), test=(d.test.x[:32], d.test.y[:32]), method="supervised",
                          student="timm:resnet18", epochs=1, run_dir=tmp_path / "r", progress="off",
                          overrides=["train.max_steps_per_epoch=1", "train.plots=false"])
    assert run.model.module.conv1.in_channels == 1 and run.predict(d.test.x[:3]).shape == (3, 10)
    # the run's card names the zoo model: it reloads as a teacher with the same outputs
    from kbricks.models.frozen import load_trained_model

    net, card = load_trained_model(run.run_dir)
    assert card["model"] == {"name": "timm:resnet18", "kwargs": {}}
    with torch.no_grad():
        assert torch.allclose(net.eval()(d.test.x[:3]), run.model.eval()(d.test.x[:3]), atol=1e-5)
    with pytest.raises(ConfigError, match="a teacher or source must be a trained network object"):
        kbricks.distill((d.train.x[:64], d.train.y[:64]), teacher=kbricks.zoo("timm:resnet18"), teacher_normalize="none",
                        epochs=1, run_dir=tmp_path / "t", progress="off")
