"""Edge-popup supermasks (Ramanujan et al. 2020) for SupSup / ImpressLearn, on any backbone.

``supermask(module)`` (models/supermask.py) turns a network into a :class:`SupermaskNet`: every ``nn.Linear`` / ``nn.Conv2d`` becomes a
masked layer whose weights are frozen signed Kaiming constants (+-sqrt(2 / fan_in), no bias), every BatchNorm
becomes a non-affine BatchNorm with running statistics per task, and every other parameter is frozen. Nothing
shared is ever trained.

What mask a layer uses is decided per call, not stored in the layer: ``with net.using(source, task=t): net(x)``
sets a *mask source* for the duration of the block and always restores the previous one. Sources:

* :class:`ScoreMasks`   - learnable real scores; mask = top-``density`` fraction by |score|, straight-through
  gradient (learning one task's mask);
* :class:`StoredMask`   - one mask of each layer's :class:`MaskBank` (a SupSup task): cost independent of how many
  masks are stored;
* :class:`Combination`  - real coefficients over the stored masks, sum_i alpha_i M_i (ImpressLearn);
* :class:`FixedMasks`   - given per-layer mask tensors (superpositions for task inference);
* :class:`CachedWeights` - any source's effective weights computed once (evaluating a task over many batches).

Masks are stored packed, 1 bit per weight, in banks that grow by doubling their capacity; combinations and task
inference read them packed (no float copy of the bank is kept).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import MODELS, input_numel

# ---- top-k with a straight-through gradient ------------------------------------------------------------------


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


# ---- packed mask storage -------------------------------------------------------------------------------------

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_BYTE_BITS = torch.tensor([[(v >> (7 - k)) & 1 for k in range(8)] for v in range(256)], dtype=torch.float32)  # [256, 8]


# x * _GATHER_BITS, for 8 little-endian bytes of 0/1 (an int64), holds byte j's bit at bit 63 - j: every other
# partial product lands on its own bit outside the top byte (no carries), so the top byte is the packed byte
_GATHER_BITS = 0x8040201008040201 - (1 << 64)  # as a signed int64 (the product wraps)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor -> uint8 bytes, 8 entries per byte (most significant bit first), zero-padded."""
    flat = mask.reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if sys.byteorder == "little":  # one multiply per 8 entries
        flat = flat.contiguous()
        if flat.storage_offset() % 8:  # a view starting mid-word (x[3:59]) cannot be read as int64: copy it
            flat = flat.clone()
        return (flat.view(torch.int64) * _GATHER_BITS).view(torch.uint8).view(-1, 8)[:, 7].contiguous()
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def byte_bits(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[256, 8]: the bits of every byte value, most significant first."""
    return _BYTE_BITS.to(device=device, dtype=dtype)


def unpack_float(packed: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_bits` as 0/1 values over the last dimension: [..., ceil(numel/8)] uint8 -> [..., numel]
    (one table lookup per byte)."""
    return F.embedding(packed.long(), byte_bits(packed.device, dtype)).flatten(-2)[..., :numel]


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` over the last dimension: [..., ceil(numel/8)] uint8 -> [..., numel] bool."""
    return unpack_float(packed, numel) > 0


class _PackedCombination(torch.autograd.Function):
    """sum_i w_i M_i from the packed bank; the gradient with respect to w_i is <M_i, grad>: both read packed."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, bank: "MaskBank") -> torch.Tensor:
        ctx.bank, ctx.bank_rows, ctx.dtype = bank, weights.shape[0], weights.dtype
        return bank._combine_packed(weights.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.bank.dots(grad, rows=ctx.bank_rows).to(ctx.dtype), None


class MaskBank(nn.Module):
    """The binary masks stored for one layer: packed 1 bit per weight, appended with capacity doubling (amortised
    O(N) per mask), saved in checkpoints packed. Reading one mask unpacks one row (cost independent of the bank
    size). Superpositions and per-mask dot products (task inference, combinations) are computed from the packed
    bytes themselves: for a block of rows and one bit position at a time, the bit is isolated with a bitwise and,
    cast into a scratch float buffer and read by one matrix-vector product, so no float copy of the bank is ever
    kept (memory: 1 bit per stored weight plus one count per weight, whatever the number of masks). The count of
    masks holding each weight is kept up to date as masks are stored, so the uniform superposition (SupSup's
    one-shot inference over every task) costs nothing on first use."""

    block_elements = 2**20  # bytes of the packed bank read per streamed block (its float scratch: 4 MiB)

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(shape)
        self.numel = int(math.prod(self.shape))
        self.nbytes = (self.numel + 7) // 8
        self._packed = torch.zeros(0, self.nbytes, dtype=torch.uint8)
        self.count = 0
        self._counts = torch.zeros(self.numel, dtype=torch.int32)  # per weight: how many stored masks hold it

    def __len__(self) -> int:
        return self.count

    def append(self, mask: torch.Tensor) -> int:
        """Store a mask; returns its slot."""
        if tuple(mask.shape) != self.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit a bank of {self.shape}")
        if self.count == self._packed.shape[0]:
            grown = torch.zeros(max(4, 2 * self.count), self.nbytes, dtype=torch.uint8, device=self._packed.device)
            grown[: self.count] = self._packed[: self.count]
            self._packed = grown
        bits = mask.detach().bool().to(self._packed.device)
        self._packed[self.count] = pack_bits(bits)
        self._counts.add_(bits.reshape(-1))
        self.count += 1
        return self.count - 1

    def get(self, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Mask ``i`` unpacked, in the layer's shape (one row is read: cost independent of the bank size)."""
        if not 0 <= i < self.count:
            raise IndexError(f"mask slot {i} out of range: {self.count} masks stored")
        return unpack_float(self._packed[i], self.numel, dtype).view(self.shape)

    def packed(self) -> torch.Tensor:
        return self._packed[: self.count]

    def as_float(self) -> torch.Tensor:
        """[count, numel] float32 0/1 matrix, unpacked now and not kept (tests, small banks)."""
        return unpack_float(self.packed(), self.numel)

    def _bit_planes(self, rows: int) -> Iterator[tuple]:
        """(first row, bit position k, plane) over the first ``rows`` masks, a block of rows at a time: ``plane``
        [n, nbytes] float holds bit k of every byte (most significant first) at its own value 2**(7 - k) or 0. The
        scratch buffers are reused: read a plane before taking the next."""
        per_block = max(1, min(rows, self.block_elements // self.nbytes))
        byte_buf = torch.empty(per_block, self.nbytes, dtype=torch.uint8, device=self._packed.device)
        float_buf = torch.empty(per_block, self.nbytes, device=self._packed.device)
        for start in range(0, rows, per_block):
            block = self._packed[start: min(rows, start + per_block)]
            n = block.shape[0]
            for k in range(8):
                torch.bitwise_and(block, 1 << (7 - k), out=byte_buf[:n])
                float_buf[:n].copy_(byte_buf[:n])
                yield start, k, float_buf[:n]

    def _byte_view(self, x: torch.Tensor) -> torch.Tensor:
        """A flat length-numel tensor as [8, bytes] (zero-padded): row k lines up with bit k of the packed bytes."""
        flat = x.reshape(-1).to(torch.float32)
        return F.pad(flat, (0, 8 * self.nbytes - self.numel)).view(self.nbytes, 8).t().contiguous()

    def _combine_packed(self, weights: torch.Tensor) -> torch.Tensor:
        by_bit = weights.new_zeros(8, self.nbytes, dtype=torch.float32)
        w = weights.to(torch.float32)
        for start, k, plane in self._bit_planes(w.shape[0]):
            # a plane holds 2**(7-k) for a set bit: scaling by a power of two back is exact
            by_bit[k].addmv_(plane.t(), w[start: start + plane.shape[0]], alpha=2.0 ** (k - 7))
        return by_bit.t().reshape(-1)[: self.numel].view(self.shape)

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * mask_i over the first ``len(weights)`` masks, in the layer's shape (differentiable
        in ``weights``: the gradient is one dot product per mask, read packed too)."""
        if weights.shape[0] > self.count:
            raise IndexError(f"{weights.shape[0]} mask weights for {self.count} stored masks")
        if weights.requires_grad and torch.is_grad_enabled():
            return _PackedCombination.apply(weights, self)
        return self._combine_packed(weights)

    def dots(self, g: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
        """<mask_i, g> for each of the first ``rows`` stored masks (all by default): [rows]."""
        rows = self.count if rows is None else rows
        by_bit = self._byte_view(g)
        out = torch.zeros(rows, device=self._packed.device)
        for start, k, plane in self._bit_planes(rows):
            out[start: start + plane.shape[0]].addmv_(plane, by_bit[k], alpha=2.0 ** (k - 7))
        return out

    def total(self) -> torch.Tensor:
        """Sum of the stored masks (the uniform superposition times ``count``), in the layer's shape; kept up to
        date as masks are stored."""
        return self._counts.to(torch.float32).view(self.shape)

    def _apply(self, fn, recurse=True):  # .to(device) moves the packed masks and the counts too
        self._packed = fn(self._packed)
        self._counts = fn(self._counts)
        return super()._apply(fn, recurse)

    # packed masks travel in state_dict as "extra state": a plain tensor, loadable with weights_only=True
    def get_extra_state(self) -> Dict[str, torch.Tensor]:
        return {"packed": self.packed().clone(), "count": torch.tensor(self.count)}

    def set_extra_state(self, state: Dict[str, torch.Tensor]) -> None:
        packed, count = state["packed"], int(state["count"])
        if packed.dtype != torch.uint8 or packed.shape != (count, self.nbytes):
            raise ValueError(f"stored masks of shape {tuple(packed.shape)} do not fit a bank of {self.shape}")
        self._packed = packed.clone().to(self._packed.device)
        self.count = count
        # the counts are not saved (the format stays 1 bit per weight): rebuilt once, here, from the packed rows
        ones = torch.ones(count, device=self._packed.device)
        self._counts = self._combine_packed(ones).reshape(-1).round().to(torch.int32)


# ---- mask sources --------------------------------------------------------------------------------------------


class MaskSource:
    def mask(self, index: int, layer: "MaskedLayer") -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        """The layer's effective weight W * mask."""
        return layer.weight * self.mask(index, layer)


class ScoreMasks(MaskSource):
    def __init__(self, scores: Sequence[torch.Tensor], density: float):
        self.scores, self.density = list(scores), density

    def mask(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        return topk_mask(self.scores[index], self.density)


class StoredMask(MaskSource):
    def __init__(self, slot: int):
        self.slot = slot

    def mask(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        return layer.bank.get(self.slot, layer.weight.dtype)


class Combination(MaskSource):
    """mask_l = sum_i alpha[l, i] M_{l,i} over the first ``alpha.shape[1]`` stored masks of each layer."""

    def __init__(self, alpha: torch.Tensor):
        self.alpha = alpha

    def mask(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        return layer.bank.combine(self.alpha[index])


class FixedMasks(MaskSource):
    def __init__(self, masks: Sequence[torch.Tensor]):
        self.masks = list(masks)

    def mask(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        return self.masks[index]


class CachedWeights(MaskSource):
    """Effective weights W * mask computed once (evaluating one task over many batches: dense-forward cost)."""

    def __init__(self, net: "SupermaskNet", source: MaskSource):
        with torch.no_grad():
            self.weights = [source.weight(i, layer) for i, layer in enumerate(net.masked_layers())]

    def mask(self, index: int, layer: "MaskedLayer") -> torch.Tensor:  # pragma: no cover - weight() is used
        return self.weights[index] / layer.weight

    def weight(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        return self.weights[index]


# ---- layers --------------------------------------------------------------------------------------------------


class MaskedLayer(nn.Module):
    """A frozen signed-constant weight, a bank of stored masks, and the mask source of the current call."""

    index: int = 0
    site: str = ""  # the converted module's path in the network (set by supermask())
    origin: str = ""  # the path of the original weight this layer's signed constants replace

    def _init_weights(self, shape: Sequence[int], fan_in: int, generator: Optional[torch.Generator]) -> None:
        std = math.sqrt(2.0 / fan_in)
        sign = torch.randint(0, 2, tuple(shape), generator=generator).float() * 2 - 1
        self.register_buffer("weight", sign * std)  # a buffer: never in an optimiser, never changes
        self.bank = MaskBank(shape)
        self.fan_in = fan_in
        self.source: Optional[MaskSource] = None

    def new_scores(self, generator: Optional[torch.Generator] = None) -> nn.Parameter:
        """Fresh edge-popup scores, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5))."""
        bound = 1.0 / math.sqrt(self.fan_in)
        s = (torch.rand(self.weight.shape, generator=generator) * 2 - 1) * bound
        return nn.Parameter(s.to(self.weight.device))

    def effective_weight(self) -> torch.Tensor:
        if self.source is None:
            raise RuntimeError("masked layer called outside `with net.using(source, task)`: no mask chosen")
        return self.source.weight(self.index, self)


class MaskedLinear(MaskedLayer):
    def __init__(self, fin: int, fout: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.in_features, self.out_features = fin, fout
        self._init_weights((fout, fin), fin, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


class MaskedConv2d(MaskedLayer):
    def __init__(self, cin: int, cout: int, kernel=3, stride=1, padding=1, dilation=1, groups: int = 1,
                 generator: Optional[torch.Generator] = None, padding_mode: str = "zeros"):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        if padding_mode != "zeros":
            raise ConfigError(f"supermask: Conv2d padding_mode {padding_mode!r} is not supported (only 'zeros')")
        fan_in = (cin // groups) * kernel[0] * kernel[1]
        self._init_weights((cout, cin // groups, *kernel), fan_in, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


class TaskBatchNorm(nn.Module):
    """Non-affine BatchNorm (any of 1d/2d/3d) with running statistics per task slot: nothing learnable, nothing
    shared across tasks. Slots are added as tasks arrive."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.channels, self.momentum, self.eps = channels, momentum, eps
        self.register_buffer("running_mean", torch.zeros(1, channels))
        self.register_buffer("running_var", torch.ones(1, channels))
        self.slot = 0
        self.mode = "running"  # or "batch" / "calibrate": see SupermaskNet.batch_statistics / calibrating
        self.seen = 0

    @property
    def slots(self) -> int:
        return self.running_mean.shape[0]

    def use_slot(self, slot: int) -> None:
        if slot >= self.slots:
            extra = slot + 1 - self.slots
            self.running_mean = torch.cat([self.running_mean, self.running_mean.new_zeros(extra, self.channels)])
            self.running_var = torch.cat([self.running_var, self.running_var.new_ones(extra, self.channels)])
        self.slot = slot

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "running_mean"
        if key in state_dict and state_dict[key].shape[0] != self.slots:  # a checkpoint with more tasks seen
            n = state_dict[key].shape[0]
            self.running_mean = self.running_mean.new_zeros(n, self.channels)
            self.running_var = self.running_var.new_ones(n, self.channels)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_slot(self, slot: int) -> None:
        current = self.slot
        self.use_slot(slot)  # grows the buffers when needed
        self.slot = current
        self.running_mean[slot].zero_()
        self.running_var[slot].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "batch":  # this batch's own statistics; nothing stored is read or changed
            return F.batch_norm(x, None, None, training=True, eps=self.eps)
        if self.mode == "calibrate":  # cumulative average of the batches seen since calibration began
            self.seen += 1
            return F.batch_norm(x, self.running_mean[self.slot], self.running_var[self.slot], training=True,
                                momentum=1.0 / self.seen, eps=self.eps)
        # F.batch_norm updates the slot's row in place (a view of the buffer)
        return F.batch_norm(x, self.running_mean[self.slot], self.running_var[self.slot], training=self.training,
                            momentum=self.momentum, eps=self.eps)


# ---- wrapped layers: a subclass with behaviour of its own keeps its own forward --------------------------------


def _owner(module: nn.Module, path: str):
    owner_path, _, leaf = path.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), leaf


def _tensor_at(module: nn.Module, path: str) -> Optional[torch.Tensor]:
    owner, leaf = _owner(module, path)
    return getattr(owner, leaf, None)


def _unregister(module: nn.Module, path: str) -> None:
    """Empty the registered tensor at ``path``: the name stays registered as None (nothing stored, nothing in the
    state dict) until :func:`_substituted` supplies a value for one call."""
    owner, leaf = _owner(module, path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = None
    elif leaf in owner._buffers:
        owner._buffers[leaf] = None
    else:
        owner.register_buffer(leaf, None)


@contextmanager
def _substituted(module: nn.Module, tensors: Dict[str, Optional[torch.Tensor]]) -> Iterator[None]:
    """Within the block, the attribute at each dotted path of ``module`` reads the given tensor: an instance
    attribute shadows the emptied registration, so the module's own forward runs unchanged on it."""
    placed = []
    try:
        for path, value in tensors.items():
            owner, leaf = _owner(module, path)
            owner.__dict__[leaf] = value
            placed.append((owner, leaf))
        yield
    finally:
        for owner, leaf in placed:
            owner.__dict__.pop(leaf, None)


class MaskedWeight(MaskedLayer):
    """One masked weight of a :class:`MaskedWrapper` (never called itself): signed constants, a bank, a source."""

    def __init__(self, shape: Sequence[int], generator: Optional[torch.Generator] = None):
        super().__init__()
        self._init_weights(tuple(shape), int(math.prod(shape[1:])), generator)


class MaskedWrapper(nn.Module):
    """A layer that keeps its own forward (a Conv2d/Linear subclass with "same" padding, weight standardisation,
    hooks...; attention's projections): the forward runs with every weight named in ``targets`` replaced by its
    masked signed constant W * mask. The original weights are dropped; the named biases are zero and frozen."""

    def __init__(self, inner: nn.Module, targets: Sequence[str], generator: Optional[torch.Generator] = None):
        super().__init__()
        self.targets = list(targets)
        self.inner = inner
        self.masked = nn.ModuleList([MaskedWeight(_tensor_at(inner, t).shape, generator) for t in self.targets])
        for t in self.targets:
            _unregister(inner, t)

    def __getattr__(self, name: str):
        # a parent reading the layer's settings (attention's batch_first, a conv's out_channels) sees the inner
        # module's; its masked weights read None there (emptied), so a direct read cannot bypass the mask silently
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None or name.startswith("__") or name in ("masked", "targets"):
                raise
            return getattr(inner, name)

    def forward(self, *args, **kwargs):
        weights = {t: layer.effective_weight() for t, layer in zip(self.targets, self.masked)}
        with _substituted(self.inner, weights):
            return self.inner(*args, **kwargs)


class WrappedTaskBatchNorm(TaskBatchNorm):
    """:class:`TaskBatchNorm` for a BatchNorm subclass with behaviour of its own (timm's BatchNormAct2d and its
    built-in activation): the subclass's forward runs on the task slot's running statistics, affine frozen at the
    identity, in the same three modes."""

    def __init__(self, inner: nn.modules.batchnorm._BatchNorm, momentum: float, eps: float):
        super().__init__(inner.num_features, momentum, eps)
        self.inner = inner
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            _unregister(inner, name)
        inner.track_running_stats = True
        with torch.no_grad():
            if inner.weight is not None:
                inner.weight.fill_(1.0)
            if inner.bias is not None:
                inner.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        if self.mode == "batch":  # eval with no statistics: the batch's own, nothing stored read or changed
            mean, var, training, momentum = None, None, False, self.momentum
        elif self.mode == "calibrate":
            self.seen += 1
            mean, var, training, momentum = self.running_mean[self.slot], self.running_var[self.slot], True, 1.0 / self.seen
        else:  # rows of the slot: F.batch_norm updates them in place
            mean, var, training, momentum = self.running_mean[self.slot], self.running_var[self.slot], self.training, self.momentum
        before = (inner.training, inner.momentum)
        inner.training, inner.momentum = training, momentum
        try:
            with _substituted(inner, {"running_mean": mean, "running_var": var}):
                return inner(x)
        finally:
            inner.training, inner.momentum = before


# ---- the network ---------------------------------------------------------------------------------------------


class SupermaskNet(nn.Module):
    """A frozen backbone whose masked layers take their masks from the source given to :meth:`using`."""

    def __init__(self, body: nn.Module, density: float):
        super().__init__()
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"supermask density must be in (0, 1], got {density}")
        self.body = body
        self.density = density
        layers = [m for m in body.modules() if isinstance(m, MaskedLayer)]
        if not layers:
            raise ConfigError("supermask: the network has no nn.Linear, nn.Conv2d or nn.MultiheadAttention layer to mask")
        for i, layer in enumerate(layers):
            layer.index = i
        self._layers = layers  # a plain list: the modules are registered once, under body
        self._bns = [m for m in body.modules() if isinstance(m, TaskBatchNorm)]

    def masked_layers(self) -> List[MaskedLayer]:
        return self._layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @contextmanager
    def using(self, source: MaskSource, task: Optional[int] = None) -> Iterator["SupermaskNet"]:
        """Within the block every masked layer takes its mask from ``source`` and every BatchNorm uses the running
        statistics of ``task`` (when given). The previous choice is restored on exit, whatever happens."""
        prev_src = [layer.source for layer in self._layers]
        prev_slot = [bn.slot for bn in self._bns]
        try:
            for layer in self._layers:
                layer.source = source
            if task is not None:
                for bn in self._bns:
                    bn.use_slot(task)
            yield self
        finally:
            for layer, s in zip(self._layers, prev_src):
                layer.source = s
            for bn, s in zip(self._bns, prev_slot):
                bn.slot = s

    @contextmanager
    def batch_statistics(self) -> Iterator["SupermaskNet"]:
        """Within the block every BatchNorm normalises with the statistics of the batch itself and no stored
        statistics are read or changed (scoring candidate masks, test-time adaptation, task inference)."""
        with self._bn_mode("batch"):
            yield self

    @contextmanager
    def calibrating(self, task: int) -> Iterator["SupermaskNet"]:
        """Within the block, forwards (with ``task``) re-estimate that task's BatchNorm statistics from scratch as
        the plain average over the batches run (after choosing a different mask for a task)."""
        for bn in self._bns:
            bn.reset_slot(task)
        with self._bn_mode("calibrate"):
            yield self

    @contextmanager
    def _bn_mode(self, mode: str) -> Iterator[None]:
        prev = [(bn.mode, bn.seen) for bn in self._bns]
        try:
            for bn in self._bns:
                bn.mode, bn.seen = mode, 0
            yield
        finally:
            for bn, (m, n) in zip(self._bns, prev):
                bn.mode, bn.seen = m, n

    def new_scores(self, generator: Optional[torch.Generator] = None) -> List[nn.Parameter]:
        return [layer.new_scores(generator) for layer in self._layers]

    @torch.no_grad()
    def store(self, masks: Sequence[torch.Tensor]) -> int:
        """Append one mask per layer to the banks; returns the slot (the same in every layer)."""
        slots = {layer.bank.append(m) for layer, m in zip(self._layers, masks)}
        if len(slots) != 1:
            raise RuntimeError(f"mask banks are out of step: slots {sorted(slots)}")
        return slots.pop()

    @torch.no_grad()
    def store_scores(self, scores: Sequence[torch.Tensor]) -> int:
        return self.store([topk_mask(s, self.density) for s in scores])

    def num_stored(self) -> int:
        return len(self._layers[0].bank)

    def weights_per_mask(self) -> int:
        return sum(layer.weight.numel() for layer in self._layers)

    def mask_bytes(self) -> int:
        """Bytes one stored mask takes in the banks (1 bit per weight, each layer padded to whole bytes)."""
        return sum(layer.bank.nbytes for layer in self._layers)

    def batchnorms(self) -> List[TaskBatchNorm]:
        return self._bns

    def bn_values_per_task(self) -> int:
        return sum(2 * bn.channels for bn in self._bns)

    def has_task_batchnorm(self) -> bool:
        return bool(self._bns)


# ---- architectures meant to be supermasked (bias-free, non-affine BatchNorm) -------------------------------------

class ConvNetForMasks(nn.Module):
    """Conv(3x3)-BN-ReLU blocks with 2x2 pooling while the map is >= 4 pixels, global average pool, linear output."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.convs.append(nn.Conv2d(cin, w, 3, 1, 1, bias=False))
            self.bns.append(nn.BatchNorm2d(w, affine=False))
            cin = w
        self.out = nn.Linear(cin, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
            if x.shape[-1] >= 4:
                x = F.max_pool2d(x, 2)
        return self.out(x.mean((2, 3)))


@MODELS.register("masked_mlp", tags=("masked",))
def masked_mlp(num_classes: int = 10, in_channels: int = 1, image_size=28, hidden: Sequence[int] = (300, 100)) -> nn.Module:
    """Bias-free ReLU MLP, every layer masked by the continual strategies (LeNet-300-100 with the defaults)."""
    sizes = [input_numel(in_channels, image_size), *hidden, num_classes]
    layers: List[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@MODELS.register("masked_convnet", tags=("masked",))
def masked_convnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, widths: Sequence[int] = (32, 64)) -> nn.Module:
    """Bias-free conv net with non-affine BatchNorm (per-task statistics once supermasked)."""
    return ConvNetForMasks(in_channels, num_classes, tuple(widths))
