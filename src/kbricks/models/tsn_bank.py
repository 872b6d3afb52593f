"""A fused bank of task-specific networks: T networks of one architecture run as one computation.

The per-task modules stay the source of truth (a brick is one task's ``state_dict``, checkpoints are unchanged);
their parameters are stacked by differentiable concatenations (gradients reach every task's own parameters), and a
stacked weight is reused while none of its parts changed (:class:`StackCache`, keyed on the parameters' in-place
version counters: an optimiser step or ``load_state_dict`` invalidates it), so repeated calls between optimiser
steps (evaluation, several forwards per step) stack nothing. The bank runs the T backbones on **channel-stacked** tensors: task t owns channels
``t*C .. (t+1)*C - 1`` of every activation. In that layout

* a convolution is one grouped convolution (``groups = T * groups``; the first one, on the shared input, one
  convolution with the T weights concatenated),
* BatchNorm is one BatchNorm over T*C channels (its running statistics are written back to every task's module),
* element-wise activations, pooling and ``flatten(1)`` need nothing, and
* a linear layer is one batched matrix product.

The backbone's ``features`` is traced once with ``torch.fx``; a network the rules above do not cover (custom
functions on parameters, dropout while training, ...) runs task by task instead, and :attr:`FusedTSNs.reason` says
why. Outputs and gradients equal the task-by-task loop to float rounding (tested to 1e-5), and the random draws
of the sampled codes are made in the loop's order, so a seeded run gives the same numbers either way.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..core.io import first_line

# modules applied unchanged to a channel-stacked tensor: element-wise or per channel over spatial positions
PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Mish, nn.Softplus, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
PER_CHANNEL_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.sigmoid, F.tanh, torch.relu, torch.sigmoid,
    torch.tanh, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub, torch.add, torch.mul, torch.sub}


class Unsupported(Exception):
    """The backbone uses something the channel-stacked form cannot express."""


class _Features(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.net = backbone

    def forward(self, x):
        return self.net.features(x)


class _Stacked:
    """A value of the fused computation: ``tensor`` holds T tasks stacked along dim 1 (``stacked``) or one value
    shared by every task (the input, and whatever is computed from it without parameters)."""

    __slots__ = ("tensor", "stacked")

    def __init__(self, tensor: torch.Tensor, stacked: bool):
        self.tensor, self.stacked = tensor, stacked


def _spatial_dims(dims, ndim: int) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return all((d % ndim) >= 2 for d in dims)


_OPTIMIZER_STEPS = [0]  # every optimiser step in the process; fused optimisers do not bump version counters
_STEP_HOOK: List[Any] = []


def _count_step(*_args) -> None:
    _OPTIMIZER_STEPS[0] += 1


class StackCache:
    """Stacked parameters reused while their parts are unchanged: an entry is stamped with the number of optimiser
    steps taken in this process (a global post-step hook counts them: fused optimisers update in place without
    bumping version counters), the parts' identities, storage addresses (``.to()`` / ``.double()`` replace them) and
    version counters (``copy_``, ``load_state_dict`` and in-place ops under ``no_grad`` bump them), and whether it was
    built with gradients on, so a stack built under ``no_grad`` is never reused where gradients must reach the parts.
    Writing into ``param.data`` in place is not seen: call :meth:`clear` after doing that. A stack is a
    concatenation, whose backward keeps no tensors, so one stack serves several backward passes."""

    def __init__(self):
        self.entries: Dict[Any, Tuple[Tuple, bool, torch.Tensor]] = {}
        self.hits = self.misses = 0
        if not _STEP_HOOK:
            _STEP_HOOK.append(register_optimizer_step_post_hook(_count_step))

    def get(self, key: Any, parts: Sequence[torch.Tensor], build: Callable[[], torch.Tensor]) -> torch.Tensor:
        stamp = (_OPTIMIZER_STEPS[0], *((id(p), p.data_ptr(), p._version) for p in parts))
        grad = torch.is_grad_enabled()
        entry = self.entries.get(key)
        if entry is not None and entry[1] == grad and entry[0] == stamp:
            self.hits += 1
            return entry[2]
        self.misses += 1
        value = build()
        self.entries[key] = (stamp, grad, value)
        return value

    def clear(self) -> None:
        self.entries.clear()


class FusedBackbones:
    """``features`` of T backbones of one architecture as one computation over channel-stacked tensors."""

    def __init__(self, backbones: Sequence[nn.Module]):
        self.backbones = list(backbones)  # only while checking; each call gets the current modules
        self.graph = fx.symbolic_trace(_Features(self.backbones[0])).graph
        self.nodes = list(self.graph.nodes)  # walked on every call: listed once
        self.cache = StackCache()
        self._bound: Tuple[Tuple[int, ...], Dict[str, List[nn.Module]]] = ((), {})
        self._check()
        self.backbones = []

    # ---- checks made once ------------------------------------------------------------------------------
    def _modules(self, target: str) -> List[nn.Module]:
        mods = self._bound[1].get(target)
        if mods is not None:
            return mods
        name = target[len("net."):] if target.startswith("net.") else target
        return [b.get_submodule(name) if name != "net" else b for b in self.backbones]

    def _bind(self, backbones: Sequence[nn.Module]) -> None:
        """Each layer's per-task modules, looked up once per set of backbones (not on every call)."""
        self.backbones = list(backbones)
        ids = tuple(id(b) for b in backbones)
        if self._bound[0] != ids:
            self._bound = ((), {})
            self._bound = (ids, {n.target: self._modules(n.target) for n in self.nodes if n.op == "call_module"})
            self.cache.clear()

    def _check(self) -> None:
        self.dropouts: List[str] = []
        shapes = [{k: tuple(v.shape) for k, v in b.state_dict().items()} for b in self.backbones]
        if any(s != shapes[0] for s in shapes[1:]):
            raise Unsupported("the task networks do not have the same parameter shapes")
        for node in self.graph.nodes:
            if node.op == "get_attr":
                raise Unsupported(f"{node.target} reads a parameter outside a layer")
            if node.op == "call_module":
                mods = self._modules(node.target)
                kinds = {type(m) for m in mods}
                reprs = {m.extra_repr() for m in mods}
                if len(kinds) > 1 or len(reprs) > 1:
                    raise Unsupported(f"layer {node.target} differs between tasks")
                m = mods[0]
                if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
                    raise Unsupported(f"{node.target}: padding_mode={m.padding_mode}")
                if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear, nn.Flatten, nn.Dropout,
                                      *PER_CHANNEL_MODULES)):
                    raise Unsupported(f"layer {node.target} ({type(m).__name__}) has no fused form")
                if isinstance(m, nn.Dropout) and m.p > 0:
                    self.dropouts.append(node.target)
                if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
                    raise Unsupported(f"{node.target}: only flatten(1) keeps the tasks apart")

    # ---- the computation -------------------------------------------------------------------------------
    def why_not(self, backbones: Sequence[nn.Module]) -> Optional[str]:
        """Why these backbones cannot run fused right now (dropout draws its random numbers task by task)."""
        if not self.dropouts:
            return None
        self._bind(backbones)
        try:
            active = [t for t in self.dropouts if self._modules(t)[0].training]
        finally:
            self.backbones = []
        return f"{active[0]}: dropout while training draws its random numbers task by task" if active else None

    def __call__(self, backbones: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> features of every task, [T, B, D]."""
        self._bind(backbones)
        try:
            return self._run(x)
        finally:
            self.backbones = []

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        T = len(self.backbones)
        env: Dict[fx.Node, Any] = {}
        post: List[Callable[[], None]] = []  # BatchNorm running statistics to write back

        def val(a):
            return fx.node.map_arg(a, lambda n: env[n])

        out = None
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = _Stacked(x, False)
            elif node.op == "call_module":
                env[node] = self._module(node, val(node.args[0]), post)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._function(node, val(node.args), val(node.kwargs))
            elif node.op == "output":
                out = val(node.args[0])
        for fn in post:
            fn()
        if not isinstance(out, _Stacked):
            raise Unsupported("features do not return one tensor")
        t = out.tensor
        if not out.stacked:
            return t.unsqueeze(0).expand(T, *t.shape)
        if t.dim() != 2:
            raise Unsupported("features are not [B, D]")
        return t.view(t.shape[0], T, -1).transpose(0, 1)

    def _stack(self, v: _Stacked) -> torch.Tensor:
        if v.stacked:
            return v.tensor
        reps = [1] * v.tensor.dim()
        reps[1] = len(self.backbones)
        return v.tensor.repeat(*reps)

    def _module(self, node: fx.Node, v: _Stacked, post: List[Callable[[], None]]) -> _Stacked:
        mods = self._modules(node.target)
        m, T = mods[0], len(mods)
        if not isinstance(v, _Stacked):
            raise Unsupported(f"{node.target} takes more than one tensor")
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            conv = F.conv2d if isinstance(m, nn.Conv2d) else F.conv1d
            w = self._stacked(node.target, "weight", mods, torch.cat)
            b = self._stacked(node.target, "bias", mods, torch.cat) if m.bias is not None else None
            if not v.stacked and m.groups == 1:
                out = conv(v.tensor, w, b, m.stride, m.padding, m.dilation, 1)
            else:
                out = conv(self._stack(v), w, b, m.stride, m.padding, m.dilation, m.groups * T)
            if out.dim() == 4:  # grouped convolutions, BatchNorm and pooling are 1.3-5x faster channels-last on CPU
                out = out.contiguous(memory_format=torch.channels_last)
            return _Stacked(out, True)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return _Stacked(self._batch_norm(node.target, mods, self._stack(v), post), True)
        if isinstance(m, nn.Linear):
            return _Stacked(self._linear(node.target, mods, v), True)
        if isinstance(m, nn.Dropout):
            if m.training and m.p > 0:
                raise Unsupported(f"{node.target}: dropout while training draws its random numbers task by task")
            return v  # the identity at evaluation
        return _Stacked(m(v.tensor), v.stacked)  # per channel / element-wise, or flatten(1)

    def _stacked(self, target: str, name: str, mods: Sequence[nn.Module], join: Callable) -> torch.Tensor:
        """``join`` (cat or stack) of every task's parameter ``name`` of layer ``target``, cached while unchanged."""
        parts = [getattr(m, name) for m in mods]
        return self.cache.get((target, name, join), parts, lambda: join(parts))

    def _batch_norm(self, target: str, mods: Sequence[nn.Module], h: torch.Tensor, post: List[Callable[[], None]]) -> torch.Tensor:
        """``_BatchNorm.forward`` over T*C channels; updated running statistics go back to every task's module."""
        m = mods[0]
        factor = 0.0 if m.momentum is None else m.momentum
        if m.training and m.track_running_stats and m.num_batches_tracked is not None:
            for bn in mods:
                bn.num_batches_tracked.add_(1)
            if m.momentum is None:
                factor = 1.0 / float(m.num_batches_tracked)
        use_batch = m.training or (m.running_mean is None and m.running_var is None)
        keep = m.running_mean is not None and (not m.training or m.track_running_stats)
        rm = torch.cat([bn.running_mean for bn in mods]) if keep else None
        rv = torch.cat([bn.running_var for bn in mods]) if keep else None
        # the running statistics are fresh copies: batch_norm updates them in place before they are written back
        weight = self._stacked(target, "weight", mods, torch.cat) if m.weight is not None else None
        bias = self._stacked(target, "bias", mods, torch.cat) if m.bias is not None else None
        out = F.batch_norm(h, rm, rv, weight, bias, use_batch, factor, m.eps)
        if keep and use_batch:
            def write_back():
                with torch.no_grad():
                    for bn, a, b in zip(mods, rm.chunk(len(mods)), rv.chunk(len(mods))):
                        bn.running_mean.copy_(a)
                        bn.running_var.copy_(b)
            post.append(write_back)
        return out

    def _linear(self, target: str, mods: Sequence[nn.Linear], v: _Stacked) -> torch.Tensor:
        T = len(mods)
        if v.tensor.dim() != 2:
            raise Unsupported("a linear layer on a tensor that is not [B, features]")
        w = self._stacked(target, "weight", mods, torch.stack)  # [T, out, in]
        b = self._stacked(target, "bias", mods, torch.stack) if mods[0].bias is not None else None
        if not v.stacked:
            out = F.linear(v.tensor, w.flatten(0, 1), b.flatten() if b is not None else None)
            return out
        h = v.tensor.view(v.tensor.shape[0], T, -1).transpose(0, 1)  # [T, B, in]
        out = torch.bmm(h, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        return out.transpose(0, 1).reshape(v.tensor.shape[0], -1)

    def _function(self, node: fx.Node, args: Tuple, kwargs: Dict[str, Any]):
        fn, name = node.target, str(node.target)
        first = args[0] if args else None
        if node.op == "call_method" and name == "size":
            if not isinstance(first, _Stacked) or len(args) != 2 or args[1] != 0:
                raise Unsupported("only x.size(0) is supported")
            return first.tensor.shape[0]
        if node.op == "call_function" and fn is getattr and args[1] == "shape":
            raise Unsupported("x.shape is not supported (use x.size(0))")
        if node.op == "call_function" and fn in BINARY:
            a, b = args[0], args[1]
            if isinstance(a, _Stacked) and isinstance(b, _Stacked):
                if a.stacked or b.stacked:
                    return _Stacked(fn(self._stack(a), self._stack(b)), True)
                return _Stacked(fn(a.tensor, b.tensor), False)
            if isinstance(a, _Stacked) and isinstance(b, (int, float)):
                return _Stacked(fn(a.tensor, b), a.stacked)
            if isinstance(b, _Stacked) and isinstance(a, (int, float)):
                return _Stacked(fn(a, b.tensor), b.stacked)
            raise Unsupported(f"{name} on these operands")
        if not isinstance(first, _Stacked) or any(isinstance(a, _Stacked) for a in list(args[1:]) + list(kwargs.values())):
            if node.op == "call_function" and fn is torch.cat:
                return self._cat(args, kwargs)
            raise Unsupported(f"{name} with these arguments")
        t, stacked = first.tensor, first.stacked
        if (node.op == "call_function" and fn in PER_CHANNEL_FUNCTIONS) or (node.op == "call_method" and name in PER_CHANNEL_METHODS):
            return _Stacked(fn(t, *args[1:], **kwargs) if node.op == "call_function" else getattr(t, name)(*args[1:], **kwargs), stacked)
        if (node.op == "call_function" and fn is torch.flatten) or (node.op == "call_method" and name == "flatten"):
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            if start != 1 or end not in (-1, t.dim() - 1):
                raise Unsupported("only flatten(1) keeps the tasks apart")
            return _Stacked(t.flatten(1), stacked)
        if node.op == "call_method" and name in ("view", "reshape"):
            shape = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else tuple(args[1])
            if len(shape) == 2 and shape[0] == t.shape[0] and shape[1] == -1:
                return _Stacked(t.flatten(1), stacked)
            raise Unsupported(f"{name}{tuple(shape)}: only x.{name}(x.size(0), -1) keeps the tasks apart")
        if (node.op == "call_method" and name in ("mean", "sum", "amax")) or (node.op == "call_function" and fn in (torch.mean, torch.sum, torch.amax)):
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            if dims is None or not _spatial_dims(dims, t.dim()):
                raise Unsupported(f"{name} over the channel or batch dimension")
            op = getattr(t, name if node.op == "call_method" else fn.__name__)
            return _Stacked(op(*args[1:], **kwargs), stacked)
        raise Unsupported(f"{name} has no fused form")

    def _cat(self, args, kwargs) -> _Stacked:
        parts, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not all(isinstance(p, _Stacked) for p in parts) or dim != 1:
            raise Unsupported("torch.cat other than of activations along dim 1")
        if not any(p.stacked for p in parts):
            return _Stacked(torch.cat([p.tensor for p in parts], 1), False)
        T = len(self.backbones)
        split = [self._stack(p) for p in parts]
        split = [s.view(s.shape[0], T, s.shape[1] // T, *s.shape[2:]) for s in split]
        joined = torch.cat(split, 2)
        return _Stacked(joined.flatten(1, 2), True)


def stacked_linear(mods: Sequence[nn.Linear], h: torch.Tensor, cache: Optional[StackCache] = None, key: str = "") -> torch.Tensor:
    """T linear layers of one shape on [T, B, in] -> [T, B, out]."""
    ws, bs = [m.weight for m in mods], [m.bias for m in mods]
    w = cache.get((key, "weight"), ws, lambda: torch.stack(ws)) if cache is not None else torch.stack(ws)
    b = cache.get((key, "bias"), bs, lambda: torch.stack(bs)) if cache is not None else torch.stack(bs)
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def padded_linear(mods: Sequence[nn.Linear], h: torch.Tensor, cache: Optional[StackCache] = None, key: str = "") -> torch.Tensor:
    """T linear layers whose output sizes may differ, on [T, B, in] -> [T, B, max out] (rows beyond a layer's
    own size are zero and carry no gradient)."""
    width = max(m.out_features for m in mods)
    ws, bs = [m.weight for m in mods], [m.bias for m in mods]

    def weight():
        return torch.stack([F.pad(w, (0, 0, 0, width - w.shape[0])) for w in ws])

    def bias():
        return torch.stack([F.pad(b, (0, width - b.shape[0])) for b in bs])

    w = cache.get((key, "weight"), ws, weight) if cache is not None else weight()
    b = cache.get((key, "bias"), bs, bias) if cache is not None else bias()
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


class FusedTSNs:
    """Every TaskSpecificNetwork of a FactorNetworks at once; ``reason`` is None when fused, else why not."""

    def __init__(self, tsns: Sequence[nn.Module]):
        self.reason: Optional[str] = None
        self.backbones: Optional[FusedBackbones] = None
        self.ids: Tuple[int, ...] = ()
        self.verified = False
        try:
            if len(tsns) < 2:
                raise Unsupported("one task: nothing to fuse")
            first = tsns[0]
            if any((t.combine, t.mu.weight.shape, t.head.in_features, t.task_head.in_features) !=
                   (first.combine, first.mu.weight.shape, first.head.in_features, first.task_head.in_features) for t in tsns):
                raise Unsupported("the task networks differ in code size or combination")
            self.backbones = FusedBackbones([t.backbone for t in tsns])
        except Unsupported as exc:
            self.reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - fx cannot trace this backbone (data-dependent control flow...)
            self.reason = f"the backbone cannot be traced ({first_line(exc, with_type=True)})"

    def why_not(self, tsns: Sequence[nn.Module]) -> Optional[str]:
        """None when ``tsns`` run fused now, else the reason they run task by task."""
        if self.reason is not None:
            return self.reason
        return self.backbones.why_not([t.backbone for t in tsns])

    def __call__(self, tsns: Sequence[nn.Module], x: torch.Tensor, z_c: torch.Tensor, sample: bool):
        """(factor logits, mu, logvar, task-only logits), one list entry per task, as the task-by-task loop;
        None when the bank cannot run these TSNs (the caller loops instead; :meth:`why_not` says why)."""
        if self.why_not(tsns) is not None:
            return None
        if self.verified:
            return self._run(tsns, x, z_c, sample)
        counters = [b for t in tsns for n, b in t.named_buffers() if n.endswith("num_batches_tracked")]
        saved = [c.clone() for c in counters]
        try:  # the first call proves the traced graph runs; a rule that fails on real shapes falls back cleanly
            out = self._run(tsns, x, z_c, sample)
        except Unsupported as exc:
            with torch.no_grad():
                for c, v in zip(counters, saved):
                    c.copy_(v)
            self.reason = str(exc)
            return None
        self.verified = True
        return out

    def _run(self, tsns: Sequence[nn.Module], x: torch.Tensor, z_c: torch.Tensor, sample: bool):
        T = len(tsns)
        h = self.backbones([t.backbone for t in tsns], x)  # [T, B, F]
        cache = self.backbones.cache  # cleared when the backbones (hence the TSNs) change
        mu = stacked_linear([t.mu for t in tsns], h, cache, "mu")
        logvar = stacked_linear([t.logvar for t in tsns], h, cache, "logvar").clamp(-10.0, 10.0)
        if sample:  # drawn task by task, in the loop's order
            eps = torch.stack([torch.randn_like(mu[i]) for i in range(T)])
            z = mu + eps * (0.5 * logvar).exp()
        else:
            z = mu
        zc = z_c.unsqueeze(0).expand(T, *z_c.shape)
        joint = torch.cat([zc, z], 2) if tsns[0].combine == "concat" else zc + z
        logits = padded_linear([t.head for t in tsns], joint, cache, "head")
        alone = padded_linear([t.task_head for t in tsns], z, cache, "task_head")
        sizes = [t.head.out_features for t in tsns]
        return ([logits[i, :, :n] for i, n in enumerate(sizes)], list(mu.unbind(0)), list(logvar.unbind(0)),
                [alone[i, :, :n] for i, n in enumerate(sizes)])
