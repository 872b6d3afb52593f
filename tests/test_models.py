import pytest
import torch

from kbricks.errors import ConfigError
from kbricks.models import count_parameters, create_model

CASES = [
    ("mlp", {}, 1, 8),
    ("small_cnn", {}, 1, 8),
    ("small_cnn", {}, 1, 28),
    ("resnet20", {}, 3, 32),
    ("resnet18", {"width": 8}, 3, 32),
    ("wrn28_2", {}, 3, 32),
    ("wrn", {"depth": 10, "widen": 1}, 1, 16),
    ("mobilenetv2", {"width_mult": 0.25}, 3, 32),
]


@pytest.mark.parametrize("name,kwargs,cin,size", CASES)
def test_forward_features_and_head(name, kwargs, cin, size):
    torch.manual_seed(0)
    m = create_model(name, num_classes=7, in_channels=cin, image_size=size, **kwargs).eval()
    x = torch.randn(3, cin, size, size)
    z = m.features(x)
    assert z.shape == (3, m.feature_dim)
    assert torch.allclose(m(x), m.head(z), atol=1e-6)
    assert m(x).shape == (3, 7)
    loss = m(x).sum()
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name,expected", [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6), ("wrn28_2", 1.47e6), ("resnet18", 11.17e6), ("mobilenetv2", 2.24e6)])
def test_parameter_counts_match_the_papers(name, expected):
    n = count_parameters(create_model(name, num_classes=10, in_channels=3, image_size=32))
    assert abs(n - expected) / expected < 0.03, n


def test_headless_model_returns_features():
    m = create_model("mlp", num_classes=0, in_channels=1, image_size=4, hidden=[5])
    assert m(torch.randn(2, 1, 4, 4)).shape == (2, 5)


def test_bad_model_argument():
    with pytest.raises(ConfigError, match="unknown argument"):
        create_model("resnet20", num_classes=10, depth=3)
