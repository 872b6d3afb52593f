"""A network's head and features are found by running it, not by the order its layers were registered in
(models.taps.find_head): the nn.Linear whose output is the network's output is the head, its input the features."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kbricks.errors import ConfigError
from kbricks.models import FeatureTap, create_model, find_head
from kbricks.models.frozen import load_frozen
from kbricks.registry import OBJECTS


class SqueezeExciteNet(nn.Module):
    """The classifier is registered first; the squeeze-excite block's fc1 / fc2 are the last registered Linears."""

    def __init__(self, num_classes=10, in_channels=1, width=16):
        super().__init__()
        self.classifier = nn.Linear(width * 16, num_classes)
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(width, 4), nn.Linear(4, width)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        z = (h * gate[:, :, None, None]).flatten(1)
        return self.drop(self.classifier(z)).flatten(1)  # eval-mode dropout and flatten keep the classifier's output


class ScaledOutput(nn.Module):
    """The logits are the classifier's output times a temperature: no Linear's output is the network's output."""

    def __init__(self, num_classes=10, in_channels=1, image_size=8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.body(x)) / 2.0


@pytest.fixture(scope="module")
def digits():
    from kbricks.data import load_dataset

    d = load_dataset("digits")
    return d.train.x, d.train.y, d.test.x, d.test.y


def test_the_head_is_the_linear_whose_output_is_the_output_not_the_last_registered():
    net = SqueezeExciteNet()
    x = torch.rand(4, 1, 8, 8)
    assert [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1] == "fc2"  # what the old rule picked
    assert find_head(net, x, "net") == "classifier"
    net.train()
    out, z = FeatureTap(net)(x)  # the features are the classifier's input, read in one forward pass
    assert z.shape == (4, 256) and net.training  # the probe pass leaves the mode as it was
    net.eval()
    assert torch.allclose(net.classifier(z), net(x), atol=1e-6)


def test_a_head_that_cannot_be_found_asks_for_head_or_features_in_one_line():
    x = torch.rand(3, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"cannot tell which layer is the classifier.*head: <layer>") as err:
        find_head(ScaledOutput(), x, "model 'scaled'")
    assert "\n" not in str(err.value) and "last nn.Linear run: 'fc'" in str(err.value)
    with pytest.raises(ConfigError, match="no nn.Linear layer.*head: <layer>"):
        find_head(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), x, "convnet")
    with pytest.raises(ConfigError, match="returns a list.*head: <layer>"):
        find_head(TwoHeads(), x, "twoheads")
    # naming the head in the spec settles it; features default to its input
    teacher = load_frozen({"path": OBJECTS.put(ScaledOutput(), "teacher"), "normalize": "none", "head": "fc"}, None, x)
    assert teacher.features(x).shape == (3, 16)
    # a student: the model config's head
    net = create_model(OBJECTS.put(ScaledOutput, "student"), num_classes=10, in_channels=1, image_size=8, head="fc")
    assert net.head is net.module.fc and net.feature_dim == 16
    undecided = create_model(OBJECTS.put(ScaledOutput, "student"), num_classes=10, in_channels=1, image_size=8)
    assert undecided(x).shape == (3, 10)  # trains as a whole; only asking for its head fails
    with pytest.raises(ConfigError, match="head: <layer>"):
        _ = undecided.feature_dim


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 2), nn.Linear(64, 3)

    def forward(self, x):
        return [self.a(x.flatten(1)), self.b(x.flatten(1))]


def test_in_place_change_after_the_linear_is_not_unchanged():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)).mul_(2.0)  # same memory, other values

    with pytest.raises(ConfigError, match="cannot tell"):
        find_head(InPlace(), torch.rand(2, 1, 8, 8), "inplace")


def test_sskt_trains_the_real_head_of_a_squeeze_excite_student(digits, tmp_path):
    """The reported failure: 9.5 % (chance) when SSKT trained an auxiliary head on fc2 while the real head idled."""
    import kbricks

    x, y, xt, yt = digits
    source = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # any label space
    run = kbricks.distill((x, y), test=(xt, yt), method="sskt", student=SqueezeExciteNet, sources=[source], teacher_normalize="none",
                          epochs=3, run_dir=tmp_path / "sskt", progress="off", overrides=["train.plots=false"])
    assert run.model.head_name == "classifier" and run.method.heads[0].in_features == 256
    assert run.summary["final"]["test/acc"] > 0.6, run.summary["final"]  # chance 0.1; before: 0.056, supervised: 0.90


def test_kf_teacher_features_come_from_the_classifiers_input(digits):
    x = digits[0][:8]
    net = SqueezeExciteNet().eval()
    teacher = load_frozen({"path": OBJECTS.put(net, "teacher"), "normalize": "none"}, None, x)
    z = teacher.features(x)
    assert z.shape == (8, 256)
    assert torch.allclose(teacher.net.classifier(z), teacher(x), atol=1e-5)


@pytest.mark.parametrize("spec, head", [("torchvision:resnet18", "fc"), ("torchvision:mobilenet_v3_small", "classifier.3"),
                                        ("timm:resnet18", "fc")])
def test_zoo_networks_find_their_head(spec, head):
    pytest.importorskip(spec.split(":")[0])
    net = create_model(spec, num_classes=10, in_channels=3, image_size=32)
    assert net.head_name == head
    x = torch.rand(2, 3, 32, 32)
    net.eval()
    out, z = net.tap(x)
    assert out.shape == (2, 10) and torch.allclose(net.head(z), out, atol=1e-5)
