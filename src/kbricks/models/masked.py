"""Edge-popup supermask layers (Ramanujan et al. 2020) for SupSup / ImpressLearn.

Weights are frozen signed Kaiming constants (+-sqrt(2 / fan_in)); nothing shared is ever trained. What a layer
uses as its mask is set from outside:
  * ``scores``  - learnable real scores; the mask is the top-``density`` fraction by |score|, with a
                  straight-through gradient (SupSup training of one task's mask);
  * ``alpha``   - real coefficients over the stored masks: mask = sum_i alpha_i M_i (superposition for task
                  inference, or an ImpressLearn combination of impressions);
  * ``cached``  - a precomputed effective weight W * mask: evaluation of a task is one dense forward.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

MASKED_MODELS = Registry("masked model")


class TopKStraightThrough(torch.autograd.Function):
    """1 for the top ``density`` fraction of ``x``, else 0; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, density: float) -> torch.Tensor:
        k = max(1, int(math.ceil(density * x.numel())))
        mask = torch.zeros_like(x)
        mask.view(-1)[torch.topk(x.reshape(-1), k, sorted=False).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    # ranking by |s|: autograd through abs() multiplies the straight-through gradient by sign(s)
    return TopKStraightThrough.apply(scores.abs(), density)


class MaskedLayer(nn.Module):
    """Shared mask machinery; subclasses say how to apply an effective weight."""

    def _init_weights(self, shape: Sequence[int], fan_in: int, generator: Optional[torch.Generator]) -> None:
        std = math.sqrt(2.0 / fan_in)
        sign = torch.randint(0, 2, tuple(shape), generator=generator).float() * 2 - 1
        self.register_buffer("weight", sign * std)  # a buffer: never in an optimiser, never changes
        self.register_buffer("masks", torch.zeros((0, *shape), dtype=torch.bool))  # stored masks, one per slot
        self.fan_in = fan_in
        self.scores: Optional[nn.Parameter] = None
        self.alpha: Optional[torch.Tensor] = None
        self.cached: Optional[torch.Tensor] = None
        self.candidates: Optional[torch.Tensor] = None  # [T, *shape] masks superposed by ``alpha`` (task inference)

    def new_scores(self, generator: Optional[torch.Generator] = None) -> nn.Parameter:
        bound = 1.0 / math.sqrt(self.fan_in)
        s = (torch.rand(self.weight.shape, generator=generator) * 2 - 1) * bound
        self.scores = nn.Parameter(s.to(self.weight.device))
        self.alpha = self.cached = None
        return self.scores

    def store_mask(self, mask: torch.Tensor) -> int:
        self.masks = torch.cat([self.masks, mask.bool().unsqueeze(0).to(self.masks.device)])
        return self.masks.shape[0] - 1

    def combine(self, alpha: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_i alpha_i M_i over the stored masks (or given ``masks``): one tensordot, k x N multiply-adds."""
        masks = self.masks if masks is None else masks
        return torch.tensordot(alpha.to(self.weight.dtype), masks.to(self.weight.dtype), dims=1)

    def effective_weight(self, density: float) -> torch.Tensor:
        if self.cached is not None:
            return self.cached
        if self.scores is not None:
            return self.weight * topk_mask(self.scores, density)
        if self.alpha is not None:
            return self.weight * self.combine(self.alpha, self.candidates)
        raise RuntimeError("masked layer has no mask source: call use_scores / use_alpha / use_cached first")


class MaskedLinear(MaskedLayer):
    def __init__(self, fin: int, fout: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.in_features, self.out_features = fin, fout
        self._init_weights((fout, fin), fin, generator)

    def forward(self, x: torch.Tensor, density: float) -> torch.Tensor:
        return F.linear(x, self.effective_weight(density))


class MaskedConv2d(MaskedLayer):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.stride, self.padding = stride, padding
        self._init_weights((cout, cin, kernel, kernel), cin * kernel * kernel, generator)

    def forward(self, x: torch.Tensor, density: float) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(density), stride=self.stride, padding=self.padding)


class TaskBatchNorm(nn.Module):
    """Non-affine BN with running statistics per task slot (nothing learnable, nothing shared across tasks)."""

    def __init__(self, channels: int, slots: int = 64):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(slots, channels))
        self.register_buffer("running_var", torch.ones(slots, channels))
        self.slot = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean[self.slot], self.running_var[self.slot], training=self.training, momentum=0.1)


class SupermaskNet(nn.Module):
    """A stack of masked layers; the network-level switches set every layer's mask source at once."""

    density: float

    def masked_layers(self) -> List[MaskedLayer]:
        return [m for m in self.modules() if isinstance(m, MaskedLayer)]

    def set_bn_slot(self, slot: int) -> None:
        for m in self.modules():
            if isinstance(m, TaskBatchNorm):
                if slot >= m.running_mean.shape[0]:
                    raise ValueError(f"TaskBatchNorm has {m.running_mean.shape[0]} slots; slot {slot} is out of range")
                m.slot = slot

    def use_scores(self, generator: Optional[torch.Generator] = None) -> List[nn.Parameter]:
        return [layer.new_scores(generator) for layer in self.masked_layers()]

    def store_scores_as_masks(self) -> int:
        slots = set()
        for layer in self.masked_layers():
            with torch.no_grad():
                slots.add(layer.store_mask(topk_mask(layer.scores, self.density)))
            layer.scores = None
        (slot,) = slots
        return slot

    def use_alpha(self, alphas: Sequence[torch.Tensor], candidates: Optional[Sequence[torch.Tensor]] = None) -> None:
        """One coefficient vector per masked layer (the same tensor may be shared by all layers), over the
        stored masks or over per-layer ``candidates`` (e.g. every task's combined mask, for task inference)."""
        for i, (layer, a) in enumerate(zip(self.masked_layers(), alphas)):
            layer.alpha, layer.scores, layer.cached = a, None, None
            layer.candidates = None if candidates is None else candidates[i]

    @torch.no_grad()
    def use_cached(self, alphas: Sequence[torch.Tensor]) -> None:
        """Evaluation: compute W * combined mask once per layer; later forwards are plain dense forwards."""
        for layer, a in zip(self.masked_layers(), alphas):
            layer.scores = layer.alpha = None
            layer.cached = layer.weight * layer.combine(a)

    def release(self) -> None:
        for layer in self.masked_layers():
            layer.scores = layer.alpha = layer.cached = layer.candidates = None

    def load_masks_state(self, state) -> None:
        """Load a state dict whose stored-mask banks may be larger than this (fresh) network's."""
        for name, layer in self.named_modules():
            if isinstance(layer, MaskedLayer) and f"{name}.masks" in state:
                layer.masks = torch.zeros_like(state[f"{name}.masks"])
        self.load_state_dict(state)

    def num_stored(self) -> int:
        return self.masked_layers()[0].masks.shape[0]

    def weights_per_mask(self) -> int:
        return sum(layer.weight.numel() for layer in self.masked_layers())


class MaskedMLP(SupermaskNet):
    """All layers masked (output included), no biases, ReLU; the LeNet-300-100 family."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (300, 100), density: float = 0.5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        sizes = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(MaskedLinear(a, b, g) for a, b in zip(sizes[:-1], sizes[1:]))
        self.density = density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.density)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h


class MaskedConvNet(SupermaskNet):
    """Conv(3x3)-TaskBN-ReLU blocks with 2x2 pooling, then a masked linear output; per-task BN statistics."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, widths: Sequence[int] = (32, 64), density: float = 0.5, seed: int = 0, bn_slots: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.convs.append(MaskedConv2d(cin, w, generator=g))
            self.bns.append(TaskBatchNorm(w, bn_slots))
            cin = w
        self.out = MaskedLinear(cin, num_classes, g)
        self.density = density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x, self.density)))
            if x.shape[-1] >= 4:
                x = F.max_pool2d(x, 2)
        return self.out(x.mean((2, 3)), self.density)


@MASKED_MODELS.register("masked_mlp")
def masked_mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: Sequence[int] = (300, 100), density: float = 0.5, seed: int = 0):
    return MaskedMLP(in_channels * image_size * image_size, num_classes, tuple(hidden), density, seed)


@MASKED_MODELS.register("masked_convnet")
def masked_convnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, widths: Sequence[int] = (32, 64), density: float = 0.5, seed: int = 0, bn_slots: int = 64):
    return MaskedConvNet(in_channels, num_classes, image_size, tuple(widths), density, seed, bn_slots)
