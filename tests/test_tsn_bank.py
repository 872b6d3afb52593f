"""The fused TSN bank computes what the task-by-task loop computes: outputs, gradients, BatchNorm statistics."""

import copy
import pickle

import pytest
import torch
from torch import nn

from kbricks.models import Classifier, create_model
from kbricks.models.factorized import FactorNetworks, TaskSpecificNetwork


def factor_networks(backbone, num_tasks=3, outputs=(3, 6, 4), combine="concat", dim=8, size=8):
    torch.manual_seed(0)
    ckn = create_model("small_cnn", num_classes=0, in_channels=1, image_size=size, widths=[8])
    cdim = ckn.feature_dim if combine == "concat" else dim
    tsns = [TaskSpecificNetwork(backbone(), dim, cdim, outputs[i % len(outputs)], combine) for i in range(num_tasks)]
    for t in tsns:  # distinct, non-trivial weights and statistics in every task
        for p in t.parameters():
            p.data.normal_(0, 0.3)
        for name, b in t.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                b.normal_(0, 0.2)
    return FactorNetworks(ckn, tsns)


def outputs_and_grads(net, x, z, sample, seed=1):
    torch.manual_seed(seed)
    out = net.tsn_outputs(x, z, sample)
    loss = sum((t * torch.linspace(-1, 1, t.shape[-1])).square().sum() for col in out for t in col)
    net.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out, grads


BACKBONES = {
    "small_cnn": lambda: create_model("small_cnn", num_classes=0, in_channels=1, image_size=8, widths=[4, 8]),
    "mlp": lambda: create_model("mlp", num_classes=0, in_channels=1, image_size=8, hidden=[16, 8]),
    "resnet8": lambda: create_model("resnet8", num_classes=0, in_channels=1, image_size=8),
}


@pytest.mark.parametrize("name, sample", [("small_cnn", True), ("small_cnn", False), ("mlp", True), ("resnet8", True)])
def test_fused_bank_equals_the_task_by_task_loop(name, sample):
    # float64: the two computations differ only by summation order, which float32 turns into ~1e-5 of noise
    # (thread-count dependent); in float64 any real difference still shows far above the 1e-5 bar
    fused = factor_networks(BACKBONES[name]).double().train()
    loop = copy.deepcopy(fused)
    loop.fused = False
    assert fused.fusion.startswith("fused") and loop.fusion.startswith("task by task")
    x, z = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randn(16, fused.ckn.feature_dim, dtype=torch.float64)
    out_f, grad_f = outputs_and_grads(fused, x, z, sample)
    out_l, grad_l = outputs_and_grads(loop, x, z, sample)
    for col_f, col_l in zip(out_f, out_l):
        assert [t.shape for t in col_f] == [t.shape for t in col_l]
        for a, b in zip(col_f, col_l):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grad_f.keys() == grad_l.keys() and any(k.startswith("tsns.2.backbone") for k in grad_f)
    for k in grad_f:
        scale = grad_l[k].abs().max().clamp_min(1.0)
        assert (grad_f[k] - grad_l[k]).abs().max() <= 1e-5 * scale, k
    # BatchNorm running statistics were updated in every task's own module, as the loop does
    for (k, a), b in zip(fused.named_buffers(), loop.buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_eval_mode_and_forward_match():
    fused = factor_networks(BACKBONES["small_cnn"]).eval()
    loop = copy.deepcopy(fused)
    loop.fused = False
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        for a, b in zip(fused(x), loop(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sum_combination_and_many_tasks():
    fused = factor_networks(BACKBONES["mlp"], num_tasks=8, outputs=(2, 5), combine="sum", dim=8)
    fused.ckn = create_model("mlp", num_classes=0, in_channels=1, image_size=8, hidden=[8])
    loop = copy.deepcopy(fused)
    loop.fused = False
    x = torch.randn(8, 1, 8, 8)
    z = torch.randn(8, 8)
    out_f, _ = outputs_and_grads(fused, x, z, True)
    out_l, _ = outputs_and_grads(loop, x, z, True)
    for a, b in zip(out_f[0], out_l[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_state_dict_and_copies_are_unchanged_by_the_bank():
    net = factor_networks(BACKBONES["small_cnn"])
    keys = list(net.state_dict())
    net(torch.randn(4, 1, 8, 8))  # builds the bank
    assert list(net.state_dict()) == keys and not any("bank" in k for k in keys)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(clone.eval()(x), net.eval()(x))
        assert clone.fusion.startswith("fused")
    # a replaced TSN module is picked up (the bank reads the current modules on every call)
    net.tsns[1] = copy.deepcopy(net.tsns[0])
    with torch.no_grad():
        out = net.eval()(torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(out[0], out[1])


class DropoutNet(Classifier):
    def __init__(self):
        super().__init__(8, 0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.5))

    def features(self, x):
        return self.body(x)


class BranchyNet(Classifier):
    def __init__(self):
        super().__init__(8, 0)
        self.fc = nn.Linear(64, 8)

    def features(self, x):
        h = self.fc(x.flatten(1))
        return h if h.sum() > 0 else -h  # data-dependent control flow: cannot be traced


@pytest.mark.parametrize("backbone, why", [(DropoutNet, "dropout"), (BranchyNet, "cannot be traced")])
def test_unsupported_backbones_run_task_by_task_and_say_why(backbone, why):
    net = factor_networks(backbone).train()
    assert why in net.fusion
    loop = copy.deepcopy(net)
    loop.fused = False
    x, z = torch.randn(8, 1, 8, 8), torch.randn(8, net.ckn.feature_dim)
    out_f, _ = outputs_and_grads(net, x, z, True)
    out_l, _ = outputs_and_grads(loop, x, z, True)
    for a, b in zip(out_f[0], out_l[0]):
        torch.testing.assert_close(a, b)
    if backbone is DropoutNet:  # in eval mode dropout is the identity: fused again
        assert net.eval().fusion.startswith("fused")


def test_cached_stacks_follow_every_optimiser_step():
    # the bank reuses stacked weights between steps; after each SGD step it must see the new weights, and the
    # gradients must keep reaching every task's own parameters, exactly as the loop's
    fused = factor_networks(BACKBONES["small_cnn"]).double().train()
    loop = copy.deepcopy(fused)
    loop.fused = False
    # fused=True: the fused kernels update in place without bumping version counters (the step hook must see them)
    opts = [torch.optim.SGD(n.parameters(), lr=1e-3, momentum=0.9, fused=f) for n, f in ((fused, True), (loop, False))]
    x, z = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randn(16, fused.ckn.feature_dim, dtype=torch.float64)
    cache = None
    for step in range(4):
        out_f, grad_f = outputs_and_grads(fused, x, z, True, seed=step)
        out_l, grad_l = outputs_and_grads(loop, x, z, True, seed=step)
        for a, b in zip(out_f[0], out_l[0]):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-7)
        assert grad_f.keys() == grad_l.keys() and len(grad_f) == len(list(fused.tsns.parameters()))
        for k in grad_f:
            scale = grad_l[k].abs().max().clamp_min(1.0)
            assert (grad_f[k] - grad_l[k]).abs().max() <= 1e-7 * scale, (step, k, (grad_f[k] - grad_l[k]).abs().max())
        cache = fused.bank().backbones.cache
        misses = cache.misses
        for opt in opts:
            opt.step()
    # a second forward between two steps stacks nothing and still back-propagates (twice through one stack)
    hits, misses = cache.hits, cache.misses
    outputs_and_grads(fused, x, z, False)
    assert cache.misses - misses == len(cache.entries) and cache.hits == hits
    _, grads = outputs_and_grads(fused, x, z, False)
    _, again = outputs_and_grads(fused, x, z, False)
    assert cache.misses - misses == len(cache.entries) and cache.hits - hits == 2 * len(cache.entries)
    for k in grads:
        assert grads[k].isfinite().all(), k
        torch.testing.assert_close(grads[k], again[k])


def test_cached_stacks_follow_loaded_weights_dtype_and_grad_mode():
    net = factor_networks(BACKBONES["small_cnn"]).eval()
    other = factor_networks(BACKBONES["small_cnn"]).eval()
    for p in other.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        net(x)
        net.load_state_dict(other.state_dict())  # copies in place: version counters move
        for a, b in zip(net(x), other(x)):
            torch.testing.assert_close(a, b)
        double = net.double()(x.double())  # new storage: a float32 stack must not be reused
    assert double[0].dtype == torch.float64
    # a stack built under no_grad carries no graph: with gradients on, it is rebuilt and gradients arrive
    net.zero_grad()
    sum(o.sum() for o in net(x.double())).backward()
    assert all(t.backbone.body[0][0].weight.grad is not None for t in net.tsns)
