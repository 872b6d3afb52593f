"""supermask() keeps every converted module's own forward and proves it at conversion time (issue 22, point 4):
subclasses with behaviour of their own are wrapped, nn.MultiheadAttention masks its projections, and a module that
cannot be converted is one ConfigError naming its type."""

import time
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbricks.models.supermask as conversion
from kbricks.errors import ConfigError
from kbricks.models import masked
from kbricks.models.masked import (
    FixedMasks,
    MaskedConv2d,
    MaskedLinear,
    MaskedWrapper,
    ScoreMasks,
    StoredMask,
    TaskBatchNorm,
    WrappedTaskBatchNorm,
)
from kbricks.models.supermask import supermask

# ---- hand-written subclasses with behaviour of their own ---------------------------------------------------


class BatchNormReLU(nn.BatchNorm2d):
    """BatchNorm with a built-in activation (like timm's BatchNormAct2d)."""

    def forward(self, x):
        return F.relu(super().forward(x))


class TFSameConv2d(nn.Conv2d):
    """TensorFlow "SAME" padding: computed from the input size, asymmetric (the extra pixel right / bottom)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, [*pads[1], *pads[0]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StandardisedConv2d(nn.Conv2d):
    """Weight standardisation (zero mean, unit variance per output channel) before the convolution."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-6).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv_net(conv=nn.Conv2d, bn=nn.BatchNorm2d, classes=4):
    return nn.Sequential(conv(3, 8, 3, 2, bias=True), bn(8), nn.ReLU(), conv(8, 8, 3, 2), bn(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


class Tokens(nn.Module):
    """Linear embedding -> self-attention -> linear head, on [N, L, D] tokens."""

    def __init__(self, dim=8, heads=2, classes=3, kdim=None):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, kdim=kdim, vdim=kdim)
        self.key = nn.Linear(5, kdim or dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        q = self.embed(x)
        out, _ = self.attn(q, self.key(x), self.key(x))
        return self.head(out.mean(1))


def probe(net, x, task=0):
    """All-ones masks: the network's output with its signed constants, eval mode."""
    net.eval()
    with net.using(FixedMasks([torch.ones_like(layer.weight) for layer in net.masked_layers()]), task=task):
        return net(x)


def score_grads(net, x, seed=0):
    """Edge-popup scores' gradients after one training step on ``x``."""
    scores = net.new_scores(torch.Generator().manual_seed(seed))
    net.train()
    with net.using(ScoreMasks(scores, net.density), task=0):
        out = net(x)
    F.cross_entropy(out, torch.zeros(len(x), dtype=torch.long)).backward()
    return [s.grad for s in scores]


def count(net, kinds):
    return sum(isinstance(m, kinds) for m in net.modules())


# ---- subclasses keep their semantics -------------------------------------------------------------------------


@pytest.mark.parametrize("conv,bn,wrapped_convs,wrapped_bns", [
    (nn.Conv2d, BatchNormReLU, 0, 2),
    (TFSameConv2d, nn.BatchNorm2d, 2, 0),
    (StandardisedConv2d, nn.BatchNorm2d, 2, 0),
])
def test_subclasses_are_wrapped_keep_their_forward_and_train(conv, bn, wrapped_convs, wrapped_bns):
    torch.manual_seed(0)
    body = conv_net(conv, bn)
    net = supermask(body, 0.5, seed=0)  # the conversion check itself passed
    assert count(net, MaskedWrapper) == wrapped_convs and count(net, WrappedTaskBatchNorm) == wrapped_bns
    assert count(net, MaskedConv2d) == 2 - wrapped_convs and count(net, MaskedLinear) == 1
    assert len(net.masked_layers()) == 3 and not any(p.requires_grad for p in net.parameters())
    # all-ones masks = the original architecture with the signed constants, zero biases, identity BatchNorm
    reference = conv_net(conv, bn).eval()
    with torch.no_grad():
        for layer in net.masked_layers():
            masked._tensor_at(reference, layer.origin).copy_(layer.weight)
        for m in reference.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    x = torch.randn(3, 3, 11, 11)
    got, want = probe(net, x), reference(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    grads = score_grads(net, x)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_builtin_activation_same_padding_and_standardisation_are_kept():
    x = torch.randn(2, 3, 10, 10)
    relu_bn = supermask(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormReLU(4)), seed=0)
    assert probe(relu_bn, x).min() == 0  # the activation still runs (a plain BatchNorm has negative outputs)
    same = supermask(nn.Sequential(TFSameConv2d(3, 4, 3, 2)), seed=0)
    assert probe(same, x).shape == (2, 4, 5, 5)  # ceil(10 / 2); without the padding: 4 x 4
    std = supermask(nn.Sequential(StandardisedConv2d(3, 4, 3)), seed=0)
    layer = std.masked_layers()[0]
    mask = (torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    with std.using(FixedMasks([mask])):
        got = std(x)
    w = layer.weight * mask  # the mask applies before the standardisation
    w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-6).sqrt()
    assert torch.allclose(got, F.conv2d(x, w), atol=1e-5)


def test_wrapped_batchnorm_keeps_per_task_statistics_and_modes():
    net = supermask(nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), BatchNormReLU(4)), seed=0)
    bn = net.batchnorms()[0]
    assert isinstance(bn, WrappedTaskBatchNorm) and bn.inner.weight is not None  # identity affine, frozen
    src = ScoreMasks(net.new_scores(torch.Generator().manual_seed(0)), 0.5)
    xs = [torch.randn(8, 1, 6, 6) + i for i in range(3)]
    net.train()
    with net.using(src, task=1):
        net(xs[0])
    assert bn.running_mean[0].eq(0).all() and bn.running_mean[1].ne(0).any()  # only task 1's slot moved
    before = bn.running_mean.clone()
    with net.batch_statistics(), net.using(src, task=1):
        out = net(xs[1])
    assert torch.equal(bn.running_mean, before) and out.min() == 0
    with net.calibrating(1), net.using(src, task=1):
        for x in xs:
            net(x)
    with torch.no_grad(), net.using(src):
        conv_out = [net.body[0](x) for x in xs]
    assert torch.allclose(bn.running_mean[1], torch.stack([c.mean((0, 2, 3)) for c in conv_out]).mean(0), atol=1e-5)
    assert bn.inner.__dict__.get("running_mean") is None and bn.inner.training  # nothing left substituted


def test_stored_masks_and_checkpoints_of_wrapped_layers_round_trip():
    x = torch.randn(2, 3, 9, 9)
    body = conv_net(TFSameConv2d, BatchNormReLU)
    net = supermask(body, seed=3)
    slot = net.store_scores(net.new_scores(torch.Generator().manual_seed(1)))
    net.eval()
    with net.using(StoredMask(slot), task=0):
        want = net(x)
    state = net.state_dict()
    assert "body.0.inner.weight" not in state and "body.1.inner.running_mean" not in state  # no stale copies
    assert {"body.0.masked.0.weight", "body.1.running_mean", "body.1.inner.weight"} <= set(state)
    fresh = supermask(body, seed=3)
    fresh.load_state_dict(state)
    fresh.eval()
    with fresh.using(StoredMask(slot), task=0):
        assert torch.equal(fresh(x), want)


# ---- nn.MultiheadAttention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention_masks_its_projections(kdim):
    torch.manual_seed(0)
    net = supermask(Tokens(kdim=kdim), seed=0)  # passes the equivalence check
    names = [layer.origin for layer in net.masked_layers()]
    projections = ["attn.in_proj_weight"] if kdim is None else ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"]
    assert names == ["embed.weight", *projections, "attn.out_proj.weight", "key.weight", "head.weight"]
    x = torch.randn(4, 7, 5)
    grads = score_grads(net, x)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # every projection's mask trains
    # a zero mask on the out-projection silences attention: the mask is really applied
    layers = net.masked_layers()
    ones = [torch.ones_like(layer.weight) for layer in layers]
    out_proj = names.index("attn.out_proj.weight")
    zeroed = [torch.zeros_like(m) if i == out_proj else m for i, m in enumerate(ones)]
    net.eval()
    with torch.no_grad(), net.using(FixedMasks(zeroed)):
        silent = net(x)
    assert torch.allclose(silent, torch.zeros_like(silent))  # head(0-bias) of zero attention output


def test_torch_transformer_layers_convert_and_never_take_the_fused_path():
    """nn.TransformerEncoder(Layer)'s fused inference paths read the attention weights directly; the converted
    network keeps them off, so inference without gradients computes what training-mode code does."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    body = nn.Sequential(nn.Linear(5, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=True), nn.Flatten(),
                         nn.Linear(8 * 4, 3))
    net = supermask(body, seed=0, example_input=torch.randn(2, 4, 5))
    assert len(net.masked_layers()) == 2 + 2 * 4  # embed, head; per layer in_proj, out_proj, linear1, linear2
    x = torch.randn(3, 4, 5)
    assert all(g.abs().sum() > 0 for g in score_grads(net, x))
    source = StoredMask(net.store_scores(net.new_scores(torch.Generator().manual_seed(2))))
    net.eval()
    with net.using(source, task=0):
        with_grad = net(x)
        with torch.no_grad():
            assert torch.allclose(net(x), with_grad, atol=1e-6)
            padded = torch.zeros(3, 4, dtype=torch.bool)
            padded[:, -1] = True
            assert net.body[1](net.body[0](x), src_key_padding_mask=padded).shape == (3, 4, 8)


# ---- what cannot be converted is refused in one line naming it ---------------------------------------------


class ReadsChildWeight(nn.Module):
    """Uses its child's weight directly (like attention's out_proj): a plain masked layer would be bypassed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6, bias=False)

    def forward(self, x):
        return F.linear(x, self.fc.weight)


class ReadsChildBias(ReadsChildWeight):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return F.linear(x, self.fc.weight, self.fc.bias)


class DetachedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.detach(), self.bias)


def one_line_error(build, *names):
    with pytest.raises(ConfigError) as err:
        build()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("supermask: ")
    for name in names:
        assert name in msg, msg
    return msg


@pytest.mark.parametrize("module,name,why", [
    (ReadsChildWeight, "ReadsChildWeight ('1.1')", "computes other outputs"),
    (ReadsChildBias, "ReadsChildBias ('1.1')", "AttributeError"),
    (lambda: nn.Sequential(DetachedLinear(6, 6)), "DetachedLinear ('1.1.0')", "does not depend on its mask"),
])
def test_unconvertible_modules_are_named(module, name, why):
    one_line_error(lambda: supermask(nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.ReLU(), module()))), name, why)


def test_the_check_catches_what_the_old_conversion_did(monkeypatch):
    """Replacing a subclass by a plain masked layer (the conversion before the fix) is refused by the check."""
    monkeypatch.setattr(conversion, "_plain", lambda *a: True)
    for conv, bn, kind in [(nn.Conv2d, BatchNormReLU, "BatchNormReLU ('1', '4')"),
                           (TFSameConv2d, nn.BatchNorm2d, "TFSameConv2d ('0')"),
                           (StandardisedConv2d, nn.BatchNorm2d, "StandardisedConv2d ('0')")]:
        msg = one_line_error(partial(supermask, conv_net(conv, bn)), kind)
        assert "computes other outputs" in msg or "fails" in msg


def test_refusals_by_name_and_probe_input_errors():
    from torch.nn.utils import parametrizations

    one_line_error(lambda: supermask(nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 4)))),
                   "'0' (ParametrizedLinear)", "remove_parametrizations")
    one_line_error(lambda: supermask(nn.Sequential(nn.Conv1d(2, 2, 3))), "'0' (Conv1d) cannot be masked")
    one_line_error(lambda: supermask(nn.Sequential(nn.Linear(4, 4)), example_input=torch.randn(2, 5)),
                   "does not accept example_input of shape (2, 5)")

    class NeedsTwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, a, b):
            return self.fc(a) + b

    one_line_error(lambda: supermask(NeedsTwoInputs()), "found no input", "example_input=")
    assert supermask(NeedsTwoInputs(), verify=False).weights_per_mask() == 16


def test_the_check_leaves_the_caller_untouched():
    body = conv_net()
    body.train()
    before = {k: v.clone() for k, v in body.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    supermask(body, seed=0)
    assert torch.equal(torch.rand(3), expected)  # the global random stream is not consumed
    assert body.training and all(torch.equal(before[k], v) for k, v in body.state_dict().items())
    assert isinstance(body[1], nn.BatchNorm2d) and not isinstance(body[1], TaskBatchNorm)


# ---- zoo models (pretrained=False) -------------------------------------------------------------------------

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid)


def activations_run(net, x):
    """How many activation modules execute in one forward pass."""
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in net.modules() if isinstance(m, ACTIVATIONS)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return len(calls)


def timm_model(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=5, **kw)


def small_resnetv2():
    pytest.importorskip("timm")
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=(1, 1, 1, 1), channels=(128, 128, 128, 128), stem_chs=32, num_classes=5, conv_layer=StdConv2d)


def torchvision_model(name, **kw):
    models = pytest.importorskip("torchvision.models")
    return getattr(models, name)(num_classes=5, **kw)


ZOO = {
    "timm:mobilenetv3_small_050": partial(timm_model, "mobilenetv3_small_050"),
    "timm:efficientnet_b0": partial(timm_model, "efficientnet_b0"),
    "timm:tf_efficientnet_b0": partial(timm_model, "tf_efficientnet_b0"),
    "timm:resnetv2 (StdConv2d, 4 blocks)": small_resnetv2,
    "timm:vit_tiny_patch16_224@32": partial(timm_model, "vit_tiny_patch16_224", img_size=32),
    "torchvision:resnet18": partial(torchvision_model, "resnet18"),
    "torchvision:vit (nn.MultiheadAttention)": partial(torchvision_model, "VisionTransformer", image_size=32, patch_size=16,
                                                       num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64),
}
SLOW_ZOO = {"timm:resnetv2_50x1_bit": partial(timm_model, "resnetv2_50x1_bit")}


def check_zoo_model(make):
    torch.manual_seed(0)
    body = make().eval()
    x = torch.randn(2, 3, 32, 32)
    start = time.perf_counter()
    net = supermask(body, 0.5, seed=0)  # raises unless the equivalence check passes
    seconds = time.perf_counter() - start
    with net.using(FixedMasks([torch.ones_like(layer.weight) for layer in net.masked_layers()]), task=0):
        assert activations_run(net, x) == activations_run(body, x)
    grads = score_grads(net, x)
    assert sum(bool(g is not None and g.abs().sum() > 0) for g in grads) == len(grads)
    return net, body, seconds


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_backbones_pass_the_equivalence_check(name):
    net, body, _ = check_zoo_model(ZOO[name])
    if name == "timm:tf_efficientnet_b0":  # Conv2dSame keeps its padding: stem 17 x 17 on 33 px, not 16 x 16
        x = torch.randn(1, 3, 33, 33)
        seen = []
        net.body.conv_stem.register_forward_hook(lambda m, a, out: seen.append(out.shape[-1]))
        probe(net, x)
        assert seen == [17]
    # every activation module is kept (the old conversion dropped BatchNormAct2d's: mobilenetv3 33 -> 10)
    assert count(body, ACTIVATIONS) == count(net, ACTIVATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_ZOO))
def test_large_stdconv_backbone_passes_the_equivalence_check(name):
    check_zoo_model(SLOW_ZOO[name])
